"""Gradient compression as DDP communication hooks: top-k with error feedback (DGC), or PowerSGD;
and local steps with a top-k + error-feedback outer sync (``LocalSGD``, method local).

Why: cross-node gradient sync is bandwidth bound; sending the k largest entries of each DDP bucket
as (index, value) pairs, and keeping the rest per rank for the next step (error feedback), cuts the
bytes on the wire by about ``1 / (2 * density)``. The design, the exact optimizer contracts for
momentum correction and ``precondition: adam``, the wire format, the byte model and the
checkpoint rule are in DESIGN.md beside this file; measured figures are in BENCHMARKS.md.

Use on any DDP model (``register`` returns the state that carries this rank's byte counters)::

    from workers import compression
    from workers.compression import CompressionConfig

    comm = compression.register(ddp_model, CompressionConfig(method="topk", density=0.01))
    ...  # train as usual
    comm.report()  # {"wire_bytes": ..., "dense_bytes": ..., "steps": ..., ...}

Local steps with a compressed outer sync (``method: local``) work on any model without DDP::

    from workers.compression import LocalSGD
    sync = LocalSGD(model, CompressionConfig(method="local", local_steps=8, density=0.01, value_bits=2))
    ...  # after every optimizer.step(): sync.step(tokens=...); before eval or saving: sync.finish_round()

Modules: ``selection`` (k, warm-up, exact or sampled top-k), ``wire`` (payload format, byte
model), ``feedback`` (error feedback, momentum correction, Adam preconditioner), ``state``
(``CommState``, ``export_state`` / ``import_state``), ``hooks`` (the hooks and ``register``),
``scaling`` (``LossScaleGuard``: fp16 loss scaling with unscaled residuals and agreed skips),
``local`` (``LocalSGD``) and ``chunks`` (its chunk-wise top-k payload with low-bit values).
"""

from workers.compression.feedback import accumulate, adam_direction, select_and_mask, topk_with_feedback
from workers.compression.hooks import (
    POWERSGD_START_ITER,
    allreduce_hook,
    guarded_topk_hook,
    powersgd_hook,
    register,
    topk_hook,
)
from workers.compression.local import LocalSGD
from workers.compression.scaling import LossScaleGuard
from workers.compression.selection import (
    SAMPLED_MIN_NUMEL,
    compress,
    num_selected,
    sampled_topk_indices,
    scheduled_density,
)
from workers.compression.state import CommState
from workers.compression.wire import (
    INDEX_BYTES,
    INDEX_DTYPE,
    MAX_BUCKET_NUMEL_INT32_INDEX,
    VALUE_DTYPES,
    decompress,
    dense_allreduce_bytes,
    pack,
    payload_dtype_for,
    powersgd_wire_numels,
    sparse_allgather_bytes,
    sparse_pays,
    unpack,
)
from workers.config import CompressionConfig

__all__ = [
    "INDEX_BYTES",
    "INDEX_DTYPE",
    "MAX_BUCKET_NUMEL_INT32_INDEX",
    "POWERSGD_START_ITER",
    "SAMPLED_MIN_NUMEL",
    "VALUE_DTYPES",
    "CommState",
    "CompressionConfig",
    "LocalSGD",
    "LossScaleGuard",
    "accumulate",
    "adam_direction",
    "allreduce_hook",
    "compress",
    "decompress",
    "dense_allreduce_bytes",
    "guarded_topk_hook",
    "num_selected",
    "pack",
    "payload_dtype_for",
    "powersgd_hook",
    "powersgd_wire_numels",
    "register",
    "sampled_topk_indices",
    "scheduled_density",
    "select_and_mask",
    "sparse_allgather_bytes",
    "sparse_pays",
    "topk_hook",
    "topk_with_feedback",
    "unpack",
]
