"""``CommState``: what the hooks keep on one rank between steps, and its world-size-free checkpoint.

Why residuals follow parameter NAMES: inside a run they live in bucket-flat buffers, but DDP
rebuilds its buckets after the first iteration (another order, other boundaries) and a resumed run
may have another world size, another bucket layout, or an expert-parallel split. Keying the
checkpoint by name, and mapping names onto a bucket lazily when the bucket is first seen, makes a
residual always follow its parameter (DESIGN.md, "Checkpoints").

Shapes: ``n`` elements in a bucket, ``total`` elements of all exported tensors together.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

from workers.compression.selection import SELECTION_SEED, scheduled_density
from workers.compression.wire import payload_dtype_for
from workers.config import CompressionConfig

logger = logging.getLogger(__name__)

# Per-parameter state kinds, as "<kind>/<parameter name>" keys in export_state's dict.
KINDS = ("residual", "velocity", "exp_avg", "exp_avg_sq")
# The kind method local saves (workers/compression/local.py, ERROR_KIND): weight units, not
# gradient units, so a per-step method resuming from such a checkpoint drops it (logged).
LOCAL_KIND = "outer_error"


@dataclass
class _BucketStore:
    """The per-kind flat buffers of one bucket for the layout ``key`` (ids of its parameters)."""

    key: tuple[int, ...]
    names: tuple[str, ...]
    numels: tuple[int, ...]
    flats: dict[str, torch.Tensor]  # kind -> (n,)


class CommState:
    """What the hooks keep between steps on one rank: config, group, residuals, counters.

    Public counters (this rank's, summed over buckets and steps; DESIGN.md, "Byte model"):
    ``wire_bytes`` (what the registered hook sent), ``dense_bytes`` (what a dense ring allreduce of
    the same buckets would have sent), ``steps`` (completed iterations), ``bucket_calls``,
    ``dense_fallback_buckets`` / ``dense_fallback_calls``, ``layout_changes``; ``report()`` returns
    them as a dict. ``register`` returns this object.

    Residuals (and velocities, Adam moments) live per bucket index in flat buffers for the bucket's
    current layout (the ids of ``bucket.parameters()``, in order). When a bucket's layout changes (DDP
    rebuilds its buckets after the first iteration, in gradient-ready order) or a parameter turns up
    in another bucket, the buckets that held those parameters are split back into per-name tensors
    (``layout_changes`` counts them) and the new buckets are assembled from those names, so residuals
    follow their parameters and nothing is dropped. ``import_state`` fills the per-name pool directly.
    """

    def __init__(
        self,
        config: CompressionConfig,
        process_group: dist.ProcessGroup | None = None,
        parameters: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.config = config
        # None: the default (WORLD) group.
        self.process_group = process_group
        params = dict(parameters or {})
        # id(parameter) -> name (register records the DDP module's trainable parameters).
        self.param_names = {id(p): name for name, p in params.items()}
        # name -> (numel, accumulation dtype), so export_state knows every parameter on every rank.
        self._param_meta = {name: (p.numel(), payload_dtype_for(p.dtype)) for name, p in params.items()
                            if p.is_floating_point()}
        self._device = next(iter(params.values())).device if params else torch.device("cpu")
        self._stores: dict[int, _BucketStore] = {}
        self._owner: dict[int, int] = {}  # id(parameter) -> bucket index holding its residual
        self._pending: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}  # kind -> name -> flat
        self._generators: dict[torch.device, torch.Generator] = {}
        self.powersgd: PowerSGDState | None = None
        # This step's learning rate over the peak one, set by the training loop before each backward
        # when the hook sends the update (DESIGN.md, "Learning-rate-weighted error feedback").
        self.lr_scale = 1.0
        # PowerSGD: bucket index -> (names, numels) of its parameters when the hook last saw it, so
        # the error memories (PyTorch keeps them flat per bucket index) can be exported by name.
        self._psgd_layouts: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        # Bytes sent by this rank: by the hook, and by a dense allreduce of the same buckets.
        self.wire_bytes = 0
        self.dense_bytes = 0
        # Completed iterations (hook calls on DDP's last bucket) and hook calls over all buckets.
        self.steps = 0
        self.bucket_calls = 0
        # Buckets whose residuals were split back into names because DDP changed their layout.
        self.layout_changes = 0
        # Bucket indices that fell back to a dense allreduce in the last completed step; all steps.
        self.dense_fallback_buckets: frozenset[int] = frozenset()
        self.dense_fallback_calls = 0
        self._fallback_now: set[int] = set()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def density(self) -> float:
        """The density the next step uses (warm-up applied)."""
        c = self.config
        return scheduled_density(self.steps, c.density, c.warmup_steps, c.warmup_start_density)

    @property
    def residuals(self) -> dict[int, torch.Tensor]:
        """Bucket index -> (n,) residual of the bucket's current layout (the live tensors)."""
        return {i: s.flats["residual"] for i, s in self._stores.items() if "residual" in s.flats}

    @property
    def velocities(self) -> dict[int, torch.Tensor]:
        """Bucket index -> (n,) momentum-correction velocity (the live tensors)."""
        return {i: s.flats["velocity"] for i, s in self._stores.items() if "velocity" in s.flats}

    def report(self) -> dict[str, Any]:
        """Counters for a progress line or a summary (this rank's bytes)."""
        return {
            "wire_bytes": self.wire_bytes,
            "dense_bytes": self.dense_bytes,
            "steps": self.steps,
            "density": self.density,
            "dense_fallback_buckets": sorted(self.dense_fallback_buckets),
            "dense_fallback_calls": self.dense_fallback_calls,
        }

    def _kinds(self) -> tuple[str, ...]:
        c = self.config
        if c.method == "powersgd":
            return ("residual",)  # PowerSGD's error memory (always on: use_error_feedback=True)
        if c.method != "topk" or not c.error_feedback:
            return ()
        if c.precondition == "adam":
            return ("residual", "exp_avg", "exp_avg_sq")
        return ("residual", "velocity") if c.momentum > 0 else ("residual",)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(SELECTION_SEED)
        return gen

    def _name(self, param: torch.Tensor) -> str:
        # Parameters register did not record (a CommState built by hand) get a process-local name.
        return self.param_names.get(id(param), f"<param {id(param):#x}>")

    def _release(self, index: int) -> None:
        """Split bucket ``index``'s flat buffers back into per-name tensors in the pending pool."""
        store = self._stores.pop(index)
        for kind, flat in store.flats.items():
            for name, part in zip(store.names, flat.split(store.numels), strict=True):
                self._pending[kind][name] = part.clone()
        for pid in store.key:
            self._owner.pop(pid, None)
        self.layout_changes += 1

    def _store(self, bucket: dist.GradBucket, n: int, dtype: torch.dtype, device: torch.device) -> _BucketStore:
        """The bucket's per-kind buffers for its current layout (see the class docstring)."""
        index = bucket.index()
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        store = self._stores.get(index)
        if store is not None and store.key == key:
            return store
        for holder in {self._owner[pid] for pid in key if pid in self._owner} | ({index} if store else set()):
            self._release(holder)
        names = tuple(self._name(p) for p in params)
        numels = tuple(p.numel() for p in params)
        if sum(numels) != n:
            raise ValueError(f"bucket {index}: parameters hold {sum(numels)} elements, the buffer {n}")
        flats = {}
        for kind in self._kinds():
            flat = torch.zeros(n, dtype=dtype, device=device)  # (n,)
            for name, part in zip(names, flat.split(numels), strict=True):
                saved = self._pending[kind].pop(name, None)
                if saved is not None:
                    if saved.numel() != part.numel():
                        raise ValueError(f"{kind} of {name!r} has {saved.numel()} elements, "
                                         f"the parameter {part.numel()}")
                    part.copy_(saved.reshape(-1))
            flats[kind] = flat
        store = self._stores[index] = _BucketStore(key, names, numels, flats)
        self._owner.update(dict.fromkeys(key, index))
        return store

    def _named(self, kind: str) -> dict[str, torch.Tensor]:
        """This rank's ``kind`` tensors by parameter name (views of live buffers, and pending ones)."""
        out = dict(self._pending[kind])
        for store in self._stores.values():
            if kind in store.flats:
                out.update(zip(store.names, store.flats[kind].split(store.numels), strict=True))
        if kind == "residual" and self.powersgd is not None:
            for index, error in self.powersgd.error_dict.items():
                names, numels = self._psgd_layouts[index]
                out.update(zip(names, error.split(numels), strict=True))
        return out

    def export_state(self, process_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """Per-parameter state averaged over ranks, by parameter name; a COLLECTIVE.

        Every rank of the group must call it (it is one allreduce when the group has more than one
        rank); every rank gets the same dict, on CPU, so one rank can save it. Keys:
        ``residual/<param name>`` and, with momentum, ``velocity/<param name>`` (with ``precondition:
        adam``: ``exp_avg/<param name>`` and ``exp_avg_sq/<param name>`` instead) -- flat tensors, one
        per trainable parameter ``register`` recorded, zeros where this rank holds nothing -- and
        ``steps`` (the hook's step count, so a resumed run continues the density warm-up and Adam's
        bias correction). Sums are taken in float64. process_group None means the hook's group.
        """
        group = process_group if process_group is not None else self.process_group
        world_size = dist.get_world_size(group) if process_group is not None else self.world_size
        local = {kind: self._named(kind) for kind in self._kinds()}
        meta = dict(self._param_meta)
        for tensors in local.values():
            for name, t in tensors.items():
                meta.setdefault(name, (t.numel(), t.dtype))
        entries = [(kind, name) for kind in local for name in sorted(meta)]
        out: dict[str, torch.Tensor] = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        if not entries:
            return out
        flat = torch.cat([  # (total,) float64
            local[kind][name].reshape(-1).to(self._device, torch.float64) if name in local[kind]
            else torch.zeros(meta[name][0], dtype=torch.float64, device=self._device)
            for kind, name in entries
        ])
        if world_size > 1:
            dist.all_reduce(flat, group=group)  # (total,) sum over ranks
        flat = flat.div_(world_size).cpu()  # (total,) mean over ranks
        sizes = [meta[name][0] for _, name in entries]
        for (kind, name), part in zip(entries, flat.split(sizes), strict=True):
            out[f"{kind}/{name}"] = part.to(meta[name][1])
        return out

    def import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Start from ``export_state``'s result (any old world size): every rank gets the saved mean.

        Replaces all per-parameter state held so far; it is mapped onto buckets by parameter name
        when each bucket is next seen. Unknown keys are an error; a kind the config does not use
        (error feedback or momentum off, no preconditioner, method local's accumulators) is dropped
        with a warning.
        """
        pending: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        steps, local = self.steps, 0
        for key, tensor in state.items():
            kind, _, name = key.partition("/")
            if key == "steps":
                steps = int(tensor)
            elif kind in KINDS and name:
                pending[kind][name] = tensor.detach().reshape(-1).clone()
            elif kind == LOCAL_KIND and name:
                local += 1
            else:
                raise ValueError(f"unknown compression state key {key!r}")
        if local:
            logger.warning("compression: %d saved %s tensors dropped (method local's; this run syncs every step)",
                           local, LOCAL_KIND)
        for kind in KINDS:
            if pending[kind] and kind not in self._kinds():
                logger.warning("compression: %d saved %s tensors dropped (not used by this config)",
                               len(pending[kind]), kind)
                pending[kind] = {}
        self._stores, self._owner, self._pending = {}, {}, pending
        if self.powersgd is not None:
            self.powersgd.error_dict.clear()
        self.steps = steps

    def residual_state(self) -> dict[str, torch.Tensor]:
        """THIS rank's state by parameter name (not averaged; no collective), for inspection.

        World-size dependent: checkpoints use ``export_state`` / ``import_state`` (workers/checkpoint.py).
        """
        state = {f"{kind}/{name}": t.detach().clone().cpu()
                 for kind in self._kinds() for name, t in self._named(kind).items()}
        state["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_residual_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore ``residual_state`` on the same rank and world size (checkpoints: ``import_state``)."""
        self.import_state(state)

    def _count(self, bucket: dist.GradBucket, dense: int, wire: int, fallback: bool = False) -> None:
        """Add one hook call's bytes; on DDP's last bucket, close the step (and log a fallback change)."""
        self.dense_bytes += dense
        self.wire_bytes += wire
        self.bucket_calls += 1
        if fallback:
            self._fallback_now.add(bucket.index())
            self.dense_fallback_calls += 1
        if bucket.is_last():
            now = frozenset(self._fallback_now)
            if now != self.dense_fallback_buckets:
                logger.info("compression: step %d: buckets %s all-reduced densely (sparse would not be "
                            "smaller at density %.4g)", self.steps, sorted(now) or "none", self.density)
            self.steps += 1
            self.dense_fallback_buckets = now
            self._fallback_now = set()
