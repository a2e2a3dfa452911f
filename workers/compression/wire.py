"""Wire format of the sparse payload and the byte model the counters use (DESIGN.md, "Wire format").

Why one payload of exactly k pairs per rank: ``all_gather`` needs equal sizes on every rank, so a
rank that selected fewer than k entries pads with index ``n`` (one past the bucket's end) and value
0, and ``decompress`` drops that extra slot. The byte model counts what ONE rank sends for a ring
collective (reduce-scatter + allgather for an allreduce); protocol headers and the backend's choice
of algorithm are not modelled.

Shapes: ``n`` elements in a bucket, ``k`` pairs per payload, ``c <= k`` pairs selected, ``N`` ranks.
"""

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

# Indices are int32 on the wire: a bucket must have fewer elements than this (the padding index n
# must fit as well).
MAX_BUCKET_NUMEL_INT32_INDEX = 2**31 - 1
INDEX_DTYPE = torch.int32
INDEX_BYTES = 4
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def payload_dtype_for(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are accumulated, selected and averaged in: float32, float64 for float64.

    Half-precision buckets accumulate in float32 so residuals do not lose small updates to rounding;
    the averaged result is rounded once into the bucket dtype.
    """
    if grad_dtype == torch.float64:
        return torch.float64
    if grad_dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise TypeError(f"top-k compression supports floating-point buckets, got {grad_dtype}")


def wire_value_dtype(acc_dtype: torch.dtype, value_dtype: str) -> torch.dtype:
    """Dtype of the values on the wire: ``value_dtype`` ("float32"/"bfloat16") for a float32
    accumulator; a float64 accumulator sends float64 unless bfloat16 was asked for."""
    if acc_dtype == torch.float32:
        return VALUE_DTYPES[value_dtype]
    return torch.bfloat16 if value_dtype == "bfloat16" else torch.float64


def dense_allreduce_bytes(n: int, elem_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allreduce of n elements: 2 * (N-1) / N * n * elem_size.

    Counted as the integer ``2 * (N-1) * n * elem_size // N`` (exact whenever N divides it); 0 for
    a group of one.
    """
    return 2 * (world_size - 1) * n * elem_size // world_size


def sparse_allgather_bytes(k: int, value_size: int, world_size: int) -> int:
    """Bytes one rank sends in a ring allgather of its k (int32 index, value) pairs."""
    return (world_size - 1) * k * (INDEX_BYTES + value_size)


def sparse_pays(n: int, k: int, elem_size: int, value_size: int, world_size: int) -> bool:
    """True when the sparse allgather sends fewer bytes than the dense ring allreduce.

    ``(N-1) * k * pair < 2 * (N-1) / N * n * elem_size`` with ``(N-1)`` divided out, compared exactly in
    integers (no floor), so it also decides for a group of one (where both send nothing). About
    ``density < 1 / N`` for float32 values.
    """
    return world_size * k * (INDEX_BYTES + value_size) < 2 * n * elem_size


def powersgd_wire_numels(bucket: dist.GradBucket, psgd: PowerSGDState) -> list[int]:
    """Element counts of the allreduces ``powerSGD_hook`` performs for this bucket at its current iter.

    Before ``start_powerSGD_iter``: one dense allreduce of the bucket. After: [uncompressed tensors
    (one batched allreduce, issued even when empty), all Ps, all Qs], with PyTorch's split: a tensor
    is viewed as (shape[0], rest) and compressed when ``(rows + cols) * r * min_compression_rate <
    rows * cols``, r = min(rows, cols, matrix_approximation_rank) -- the same split that
    ``PowerSGDState.compression_stats`` reports in elements.
    """
    if psgd.iter < psgd.start_powerSGD_iter:
        return [bucket.buffer().numel()]
    uncompressed = ps = qs = 0
    for p in bucket.parameters():
        rows = p.shape[0] if p.dim() else 1
        cols = p.numel() // rows if rows else 0
        r = min(rows, cols, psgd.matrix_approximation_rank)
        if (rows + cols) * r * psgd.min_compression_rate < rows * cols:
            ps += rows * r
            qs += cols * r
        else:
            uncompressed += rows * cols
    return [uncompressed, ps, qs]


def pack(idx: torch.Tensor, vals: torch.Tensor, k: int, pad_index: int) -> torch.Tensor:
    """(c,) indices and (c,) wire values, c <= k -> one uint8 payload ``[k int32 indices | k values]``.

    The k - c missing pairs are (pad_index, 0); the hook pads with ``n``, which ``decompress`` drops.
    """
    pad = k - idx.numel()
    if pad < 0:
        raise ValueError(f"{idx.numel()} pairs do not fit a payload of {k}")
    idx32 = idx.to(INDEX_DTYPE)  # (c,)
    if pad:
        idx32 = torch.cat([idx32, torch.full((pad,), pad_index, dtype=INDEX_DTYPE, device=idx.device)])  # (k,)
        vals = torch.cat([vals, torch.zeros(pad, dtype=vals.dtype, device=vals.device)])  # (k,)
    return torch.cat([idx32.view(torch.uint8), vals.view(torch.uint8)])  # (k * (4 + value_size),)


def unpack(gathered: torch.Tensor, k: int, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * k * (4 + value_size),) gathered uint8 payloads -> indices (N*k,) int64, values (N*k,)."""
    per_rank = gathered.view(-1, k * (INDEX_BYTES + value_dtype.itemsize))  # (N, payload bytes)
    all_idx = per_rank[:, : k * INDEX_BYTES].contiguous().view(INDEX_DTYPE).reshape(-1).long()  # (N*k,)
    all_vals = per_rank[:, k * INDEX_BYTES :].contiguous().view(value_dtype).reshape(-1)  # (N*k,)
    return all_idx, all_vals


def decompress(all_idx: torch.Tensor, all_vals: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """Average of the N sparse contributions as a dense (n,) tensor; overlapping indices add up.

    Indices may be ``n`` (padding): they land in an extra slot that is dropped. index_add_ is
    deterministic on CPU (sequential); on CUDA it uses atomics, so the summation order of indices
    chosen by several ranks, and hence the last bit, may vary from run to run.
    """
    dense = torch.zeros(n + 1, dtype=all_vals.dtype, device=all_vals.device)  # (n + 1,)
    dense.index_add_(0, all_idx, all_vals)  # (n + 1,) sum over ranks; slot n collects padding
    return dense[:n].div_(world_size)  # (n,) mean over ranks
