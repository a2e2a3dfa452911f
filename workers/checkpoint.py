"""World-size-independent training checkpoints: save on N workers, resume on M, any EP size.

One folder per checkpoint, written by world rank 0 after collectives on every rank::

    model.pt        the full single-process state dict: experts by global id (E, ...), router biases
    optim.pt        {"step": int, "state": {moment: {parameter name: full tensor}}, "scaler": the
                    fp16 GradScaler's state_dict or None}: AdamW moments keyed like model.pt
                    (expert moments gathered by global id), empty for SGD; the scaler's state so a
                    resume keeps the loss scale (the same on every rank)
    compression.pt  the hook's per-parameter state keyed "<kind>/<name>" (flat: residual, velocity,
                    and with precondition adam the local moments exp_avg / exp_avg_sq; PowerSGD's
                    error memory as residual), plus
                    "steps"; the MEAN over the ranks that averaged each tensor (dense parameters: all
                    ranks; experts: their replicas, gathered by global id)
    meta.json       step, data position (sequences consumed in the epoch, over all workers), byte
                    totals, the world and EP sizes that wrote it
    tokenizer.json  the tokenizer of the data it was trained on (workers/data/tokenizer.py), so a serving
                    replica that has no shards to find it beside encodes and decodes as training did

Why the mean carries error feedback across a resize: every step applies the average of what the
workers send, so the unsent gradient mass of the whole job is the average of their residuals.
Giving each of the M new workers that average keeps the next applied update's share of it exact
((1/M) * M * mean = mean), whatever N and M are (see workers/compression/state.py, export_state).

Why experts are saved by global id: with expert parallelism (workers/moe/parallel.py) each rank
holds only rows [ep_rank * G, (ep_rank + 1) * G) of every stacked expert weight, under the EP
model's names (``...experts.local.w1``). ``gather_expert_state`` concatenates those slices back
into the single-process state dict (``...experts.w1`` of shape (E, ...)), for weights, optimizer
moments and residuals alike, and ``shard_expert_state`` cuts them again for whatever EP size
loads them, so the files never depend on the layout that wrote them.

Why every read goes through workers/confine.py: a team's checkpoint folder is checked at
submission on its top folder only; a ``step-*`` folder or ``model.pt`` inside it that links to
another team's files would otherwise serve or resume from their weights. Each file is opened under
the job's roots (``ORCH_DATA_ROOTS``) and refused with OutsideRoots naming it; unconfined jobs read
as before. ``torch.load`` always runs with ``weights_only=True``: a checkpoint never runs code.

Shape suffixes used in comments:
    E  routed experts in the model (global ids)
    G  experts owned by one rank (E / EP size)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from torch import Tensor

from workers import confine
from workers.compression import CommState
from workers.config import ModelConfig
from workers.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from workers.moe.dispatch import ExpertParallelExperts
from workers.moe.grad_sync import ExpertGradSync
from workers.moe.groups import ParallelGroups
from workers.moe.model import MoETransformer

FORMAT_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
Also = Iterable[str | os.PathLike]  # folders a reader may open beyond the job's roots (confine.open_file)


# ----------------------------------------------------------------------------------------------
# Expert-parallel state by global expert id


def _sharded_keys(model: MoETransformer) -> dict[str, tuple[str, ExpertParallelExperts]]:
    """EP state-dict key -> (key in a single-process state dict, its EP module)."""
    keys = {}
    for path, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, _ in module.local.named_parameters():
                keys[f"{path}.local.{name}"] = (f"{path}.{name}", module)
    return keys


def gather_expert_state(
    model: MoETransformer, groups: ParallelGroups, state: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor] | None:
    """The full single-process state dict, experts concatenated back to (E, ...) by global id.

    ``state`` (default: the model's state dict) may be any dict keyed like the EP model's state
    dict, e.g. one optimizer moment or error-feedback residual per parameter: its expert entries
    are gathered the same way, so optimizer and compression state are saved by global id too.

    Collective over the EP group (every rank calls it); returned on EP rank 0 of each EP group,
    None elsewhere. World rank 0 is EP rank 0 of the first group: save what it gets. The result
    loads into a plain ``MoETransformer`` with ``load_state_dict``, or into an EP model of any EP
    size with ``load_expert_state``.
    """
    sharded = _sharded_keys(model)
    root = groups.ep_rank == 0
    out: dict[str, Tensor] = {}
    for key, value in (model.state_dict() if state is None else state).items():
        if key not in sharded:
            out[key] = value
            continue
        full_key, module = sharded[key]
        if module.ep_size != groups.ep_size:
            raise ValueError(f"{key} is sharded over {module.ep_size} ranks, groups say {groups.ep_size}")
        if groups.ep_size == 1:
            out[full_key] = value
            continue
        value = value.contiguous()  # (G, ...)
        parts = [torch.empty_like(value) for _ in range(groups.ep_size)] if root else None
        dist.gather(value, parts, group=groups.ep_group, group_dst=0)
        if root:
            out[full_key] = torch.cat(parts, dim=0)  # (E, ...)
    return out if root else None


def shard_expert_state(
    model: MoETransformer, full_state_dict: Mapping[str, Tensor], groups: ParallelGroups
) -> dict[str, Tensor]:
    """The inverse of ``gather_expert_state``: a FULL (single-process keyed) dict -> this rank's
    EP-keyed dict, expert entries cut to rows [ep_rank * G, (ep_rank + 1) * G). No communication."""
    sharded = _sharded_keys(model)
    by_full_key = {full_key: (key, module) for key, (full_key, module) in sharded.items()}
    local: dict[str, Tensor] = {}
    for full_key, value in full_state_dict.items():
        if full_key not in by_full_key:
            local[full_key] = value
            continue
        key, module = by_full_key[full_key]
        if module.ep_rank != groups.ep_rank or module.ep_size != groups.ep_size:
            raise ValueError(f"{key} was sharded for another EP layout than {groups}")
        if value.shape[0] != module.n_experts:
            raise ValueError(f"{full_key} has {value.shape[0]} experts, the model {module.n_experts}")
        lo = module.first_expert
        local[key] = value[lo : lo + module.n_local_experts]  # (G, ...)
    return local


def load_expert_state(
    model: MoETransformer, full_state_dict: Mapping[str, Tensor], groups: ParallelGroups
) -> None:
    """Loads a FULL (single-process format) state dict into an EP model: this rank's expert rows
    and every dense tensor, strictly (unknown or missing keys raise). No communication: every rank
    reads the same full checkpoint, whatever EP size wrote it.
    """
    model.load_state_dict(shard_expert_state(model, full_state_dict, groups), strict=True)


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def _kinds(state: Mapping[str, Tensor]) -> list[str]:
    """Per-parameter kinds in a compression state ("residual", "velocity", "exp_avg", ...)."""
    return sorted({key.partition("/")[0] for key in state if "/" in key})


def _gather(model: MoETransformer, groups: ParallelGroups | None, state: Mapping[str, Tensor]) -> dict | None:
    return dict(state) if groups is None else gather_expert_state(model, groups, state)


def _shard(model: MoETransformer, groups: ParallelGroups | None, full: Mapping[str, Tensor]) -> dict:
    return dict(full) if groups is None else shard_expert_state(model, full, groups)


def _optimizer_state(model: MoETransformer, optimizer: torch.optim.Optimizer,
                     groups: ParallelGroups | None) -> dict[str, Any] | None:
    """Per-parameter tensors of the optimizer (AdamW: exp_avg, exp_avg_sq) keyed by full name."""
    by_kind: dict[str, dict[str, Tensor]] = {}
    step = 0
    for name, p in model.named_parameters():
        for kind, value in optimizer.state.get(p, {}).items():
            if kind == "step":
                step = int(value)
            elif torch.is_tensor(value) and value.shape == p.shape:
                by_kind.setdefault(kind, {})[name] = value
    gathered = {kind: _gather(model, groups, tensors) for kind, tensors in sorted(by_kind.items())}
    if any(v is None for v in gathered.values()):
        return None  # not the EP group's root
    return {"step": step, "state": gathered}


def _compression_state(model: MoETransformer, comm: CommState, esync: ExpertGradSync | None,
                       groups: ParallelGroups | None) -> dict[str, Tensor] | None:
    state = comm.export_state()  # dense parameters (all of them without EP): mean over the world
    if esync is None:
        return state
    experts = esync.state.export_state(groups.expert_dp_group)  # mean over each expert's replicas
    shapes = dict((name, p.shape) for name, p in model.named_parameters())
    gathered = {}
    for kind in _kinds(experts):  # every rank takes part in every gather, root or not
        local = {k.partition("/")[2]: v.view(shapes[k.partition("/")[2]])
                 for k, v in experts.items() if k.startswith(kind + "/")}
        gathered[kind] = _gather(model, groups, local)
    if any(full is None for full in gathered.values()):
        return None  # not the EP group's root
    for kind, full in gathered.items():
        state.update({f"{kind}/{name}": t.reshape(-1) for name, t in full.items()})
    return state


def save(path: Path, *, model: MoETransformer, optimizer: torch.optim.Optimizer, comm: CommState,
         esync: ExpertGradSync | None, groups: ParallelGroups | None, meta: dict[str, Any], rank: int,
         scaler: torch.amp.GradScaler | None = None, tokenizer_json: str | None = None) -> None:
    """Collective: every rank calls it; world rank 0 writes the files into ``path`` (with the data's
    tokenizer, ``to_json()``, when given)."""
    model_state = _gather(model, groups, model.state_dict())
    optim_state = _optimizer_state(model, optimizer, groups)
    comp_state = _compression_state(model, comm, esync, groups)
    if rank != 0:
        return
    torch.save(model_state, path / "model.pt")
    torch.save(optim_state | {"scaler": scaler.state_dict() if scaler is not None else None}, path / "optim.pt")
    torch.save(comp_state, path / "compression.pt")
    if tokenizer_json is not None:
        (path / TOKENIZER_FILE).write_text(tokenizer_json)
    (path / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}))


def _open(path: Path, also: Also) -> IO:
    """``path`` opened for reading under this job's confinement (workers/confine.py): a checkpoint
    file, or a ``step-*`` folder holding it, that links out of the team's roots is refused
    (OutsideRoots naming it), whenever it was planted; ``also``: folders this process made itself
    (a download of an ``s3://`` checkpoint)."""
    return confine.open_file(path, also=also)


def _torch_load(path: Path, map_location: str | torch.device, also: Also) -> Any:
    # weights_only: a checkpoint folder may come from elsewhere; never unpickle code from it.
    with _open(path, also) as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def read_meta(path: Path, *, also: Also = ()) -> dict[str, Any]:
    with _open(path / "meta.json", also) as f:
        meta = json.loads(f.read())
    if meta.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format {meta.get('format')}, this code reads {FORMAT_VERSION}")
    return meta


def load_tokenizer_for(path: Path, *, also: Also = ()) -> Tokenizer:
    """The tokenizer the checkpoint in ``path`` was trained with; the byte tokenizer for checkpoints
    that store none (trained on byte shards before checkpoints carried one)."""
    stored = path / TOKENIZER_FILE
    if not stored.is_file():
        return ByteTokenizer()
    with _open(stored, also) as f:
        return load_tokenizer(f.read().decode("utf-8"))


def load_model(path: Path, config: ModelConfig | None = None, device: str | torch.device = "cpu", *,
               also: Also = ()) -> MoETransformer:
    """The checkpoint's model in one process, in eval mode, for sampling and serving: whatever
    world and EP sizes wrote it (model.pt holds every expert by global id). ``config`` defaults to
    the one saved in meta.json."""
    meta = read_meta(path, also=also)
    if config is None:
        if "model" not in meta:
            raise RuntimeError(f"checkpoint {path} does not record its model config; pass the spec's model section")
        config = ModelConfig.model_validate(meta["model"])
    model = MoETransformer(config).to(device)
    model.load_state_dict(_torch_load(path / "model.pt", device, also), strict=True)
    return model.eval()


def load_model_and_optimizer(path: Path, *, model: MoETransformer, optimizer: torch.optim.Optimizer,
                             groups: ParallelGroups | None, device: torch.device,
                             scaler: torch.amp.GradScaler | None = None, also: Also = ()) -> None:
    """Weights and optimizer moments in place, sliced for this rank's experts (every rank loads the
    same files, so DDP's replicas stay equal); the fp16 loss scale when both sides have a scaler."""
    model.load_state_dict(_shard(model, groups, _torch_load(path / "model.pt", device, also)), strict=True)
    saved = _torch_load(path / "optim.pt", device, also)
    params = dict(model.named_parameters())
    for kind, full in saved["state"].items():
        for name, tensor in _shard(model, groups, full).items():
            state = optimizer.state[params[name]]
            state[kind] = tensor.clone()
            state["step"] = torch.tensor(float(saved["step"]))
    if scaler is not None and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])


def load_compression(path: Path, *, model: MoETransformer, comm: CommState, esync: ExpertGradSync | None,
                     groups: ParallelGroups | None, also: Also = ()) -> None:
    """After the hooks exist: each rank starts from the saved mean residuals (any world size)."""
    saved = _torch_load(path / "compression.pt", "cpu", also)
    if esync is None:
        comm.import_state(saved)
        return
    params = dict(model.named_parameters())
    full_shapes = {name: t.shape for name, t in _torch_load(path / "model.pt", "cpu", also).items()}
    expert_full = {full for full in full_shapes if full not in params}  # sharded: EP names differ
    dense = {k: v for k, v in saved.items() if k == "steps" or k.partition("/")[2] not in expert_full}
    comm.import_state(dense)
    experts: dict[str, Tensor] = {"steps": saved["steps"]}
    for kind in _kinds(saved):
        full = {k.partition("/")[2]: v.view(full_shapes[k.partition("/")[2]])
                for k, v in saved.items() if k.startswith(kind + "/") and k.partition("/")[2] in expert_full}
        experts.update({f"{kind}/{name}": t.reshape(-1) for name, t in _shard(model, groups, full).items()})
    esync.state.import_state(experts)
