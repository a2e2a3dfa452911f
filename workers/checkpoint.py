"""World-size-independent training checkpoints: save on N workers, resume on M, any EP size.

One folder per checkpoint, written by world rank 0 after collectives on every rank::

    model.pt        the full single-process state dict: experts by global id (E, ...), router biases
    optim.pt        {"step": int, "state": {moment: {parameter name: full tensor}}}: AdamW moments
                    keyed like model.pt (expert moments gathered by global id); empty for SGD
    compression.pt  the hook's per-parameter state keyed "<kind>/<name>" (flat: residual, velocity,
                    and with precondition adam the local moments exp_avg / exp_avg_sq; PowerSGD's
                    error memory as residual), plus
                    "steps"; the MEAN over the ranks that averaged each tensor (dense parameters: all
                    ranks; experts: their replicas, gathered by global id)
    meta.json       step, data position (sequences consumed in the epoch, over all workers), byte
                    totals, the world and EP sizes that wrote it

Why the mean carries error feedback across a resize: every step applies the average of what the
workers send, so the unsent gradient mass of the whole job is the average of their residuals.
Giving each of the M new workers that average keeps the next applied update's share of it exact
((1/M) * M * mean = mean), whatever N and M are (see workers/compression.py, export_state).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.compression import CommState
from workers.moe.model import MoETransformer
from workers.moe.parallel import ExpertGradSync, ParallelGroups, gather_expert_state, shard_expert_state

FORMAT_VERSION = 2


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
         esync: ExpertGradSync | None, groups: ParallelGroups | None, meta: dict[str, Any], rank: int) -> None:
    """Collective: every rank calls it; world rank 0 writes the files into ``path``."""
    model_state = _gather(model, groups, model.state_dict())
    optim_state = _optimizer_state(model, optimizer, groups)
    comp_state = _compression_state(model, comm, esync, groups)
    if rank != 0:
        return
    torch.save(model_state, path / "model.pt")
    torch.save(optim_state, path / "optim.pt")
    torch.save(comp_state, path / "compression.pt")
    (path / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, **meta}))


def read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format {meta.get('format')}, this code reads {FORMAT_VERSION}")
    return meta


def load_model_and_optimizer(path: Path, *, model: MoETransformer, optimizer: torch.optim.Optimizer,
                             groups: ParallelGroups | None, device: torch.device) -> None:
    """Before DDP wraps the model: weights and optimizer moments, sliced for this rank's experts."""
    model.load_state_dict(_shard(model, groups, torch.load(path / "model.pt", map_location=device)), strict=True)
    saved = torch.load(path / "optim.pt", map_location=device)
    params = dict(model.named_parameters())
    for kind, full in saved["state"].items():
        for name, tensor in _shard(model, groups, full).items():
            state = optimizer.state[params[name]]
            state[kind] = tensor.clone()
            state["step"] = torch.tensor(float(saved["step"]))


def load_compression(path: Path, *, model: MoETransformer, comm: CommState, esync: ExpertGradSync | None,
                     groups: ParallelGroups | None) -> None:
    """After the hooks exist: each rank starts from the saved mean residuals (any world size)."""
    saved = torch.load(path / "compression.pt", map_location="cpu")
    if esync is None:
        comm.import_state(saved)
        return
    params = dict(model.named_parameters())
    full_shapes = {name: t.shape for name, t in torch.load(path / "model.pt", map_location="cpu").items()}
    expert_full = {full for full in full_shapes if full not in params}  # sharded: EP names differ
    dense = {k: v for k, v in saved.items() if k == "steps" or k.partition("/")[2] not in expert_full}
    comm.import_state(dense)
    experts: dict[str, Tensor] = {"steps": saved["steps"]}
    for kind in _kinds(saved):
        full = {k.partition("/")[2]: v.view(full_shapes[k.partition("/")[2]])
                for k, v in saved.items() if k.startswith(kind + "/") and k.partition("/")[2] in expert_full}
        experts.update({f"{kind}/{name}": t.reshape(-1) for name, t in _shard(model, groups, full).items()})
    esync.state.import_state(experts)
