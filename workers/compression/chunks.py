"""The outer sync's payload (method local): chunk-wise top-k, low-bit values with per-chunk scales.

Why chunks: one top-k over the whole model lets a few layers with large changes take every slot;
a fixed k per chunk of CHUNK_NUMEL consecutive elements spreads the sent entries over the model,
makes every payload the same size (all_gather needs that) and lets an index be the position inside
its chunk: 12 bits (two indices in 3 bytes) instead of 4 bytes. Why low-bit values: what is not
sent exactly (the rounding to ``2 ** bits`` levels) stays in the error-feedback accumulator, so
coarse values lose nothing for good; a sent entry then costs 1.5 bytes of index plus ``bits / 8``
of value (SparseLoCo, Sarfi et al. 2025: 2-bit values). DESIGN.md, "Local steps", has the byte model.

Shapes: ``n`` elements synced, ``c`` chunks (``c * CHUNK_NUMEL >= n``, the last one zero-padded),
``k`` entries sent per chunk, ``N`` ranks.
"""

import math

import torch

# Elements per chunk; an index inside a chunk travels in CHUNK_INDEX_BITS bits (2 ** 12 = 4096).
CHUNK_NUMEL = 4096
CHUNK_INDEX_BITS = 12
# One float32 scale per chunk for values below 32 bits; one float32 weight (tokens) per payload.
SCALE_BYTES = 4
WEIGHT_BYTES = 4
# Relative slack on density * CHUNK_NUMEL before rounding up (as selection.DENSITY_ROUNDING_SLACK).
DENSITY_ROUNDING_SLACK = 1e-12


def chunks_for(n: int) -> int:
    """Chunks that hold n elements (the last one zero-padded)."""
    return max(1, math.ceil(n / CHUNK_NUMEL))


def per_chunk(density: float) -> int:
    """k = ceil(density * CHUNK_NUMEL), at least 1 and at most the chunk."""
    return min(CHUNK_NUMEL, max(1, math.ceil(density * CHUNK_NUMEL * (1.0 - DENSITY_ROUNDING_SLACK))))


def value_bytes(k: int, bits: int) -> int:
    """Bytes of one chunk's k values (codes packed 8 / bits to a byte, or float32)."""
    return k * 4 if bits == 32 else math.ceil(k * bits / 8)


def index_bytes(m: int) -> int:
    """Bytes of m packed 12-bit indices (two in three bytes)."""
    return math.ceil(m * CHUNK_INDEX_BITS / 8)


def payload_bytes(chunks: int, k: int, bits: int) -> int:
    """Bytes of one rank's payload: indices, packed values, per-chunk scales (bits < 32), weight."""
    per_chunk_values = chunks * k * 4 if bits == 32 else math.ceil(chunks * k * bits / 8)
    scales = 0 if bits == 32 else chunks * SCALE_BYTES
    return index_bytes(chunks * k) + per_chunk_values + scales + WEIGHT_BYTES


def select(acc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of largest magnitude of each chunk of acc (c * CHUNK_NUMEL,):
    (indices inside the chunk (c, k) int64, values (c, k))."""
    view = acc.view(-1, CHUNK_NUMEL)  # (c, CHUNK_NUMEL)
    idx = torch.topk(view.abs(), k, dim=1, sorted=False).indices  # (c, k)
    return idx, view.gather(1, idx)


def quantize(vals: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c, k) values -> (codes (c, k) uint8, scale (c,) float32), or (float32 values, None) at 32 bits.

    ``2 ** bits`` levels evenly spaced over [-scale, scale], no zero level (a sent entry is among its
    chunk's largest), scale = the chunk's largest magnitude; round to nearest.
    """
    if bits == 32:
        return vals.float(), None
    top = 2**bits - 1
    scale = vals.abs().amax(dim=1).float()  # (c,)
    step = torch.where(scale > 0, 2 * scale / top, torch.ones_like(scale))  # (c,) 1: all-zero chunk
    codes = torch.round(vals.float() / step[:, None] + top / 2).clamp_(0, top)  # (c, k)
    return codes.to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``quantize``'s (c, k) codes back to float32 values."""
    if bits == 32:
        return codes.float()
    top = 2**bits - 1
    return (codes.float() - top / 2) * (2 * scale / top)[:, None]  # (c, k)


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(m,) uint8 codes of ``bits`` bits -> (ceil(m * bits / 8),) uint8, 8 / bits codes per byte."""
    per_byte = 8 // bits
    pad = (-codes.numel()) % per_byte
    flat = torch.cat([codes, codes.new_zeros(pad)]) if pad else codes  # (m + pad,)
    groups = flat.view(-1, per_byte).to(torch.int32)  # (bytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * bits  # (per_byte,)
    return (groups << shifts).sum(dim=1).to(torch.uint8)  # (bytes,)


def _unpack_bits(packed: torch.Tensor, m: int, bits: int) -> torch.Tensor:
    """``_pack_bits``' inverse: the first m codes, (m,) uint8."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits  # (per_byte,)
    codes = (packed.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)  # (bytes, per_byte)
    return codes.reshape(-1)[:m].to(torch.uint8)


def _pack_indices(idx: torch.Tensor) -> torch.Tensor:
    """(m,) indices in [0, 4096) -> (index_bytes(m),) uint8: each pair a, b as the three bytes
    ``a & 255``, ``(a >> 8) | (b & 15) << 4``, ``b >> 4`` (a zero index pads an odd m)."""
    m = idx.numel()
    flat = torch.cat([idx, idx.new_zeros(m % 2)]).to(torch.int32).view(-1, 2)  # (ceil(m / 2), 2)
    a, b = flat[:, 0], flat[:, 1]
    out = torch.stack([a & 255, (a >> 8) | ((b & 15) << 4), b >> 4], dim=1)  # (ceil(m / 2), 3)
    return out.reshape(-1)[: index_bytes(m)].to(torch.uint8)


def _unpack_indices(packed: torch.Tensor, m: int) -> torch.Tensor:
    """``_pack_indices``' inverse: (m,) int64."""
    full = torch.cat([packed, packed.new_zeros((-packed.numel()) % 3)]).long().view(-1, 3)  # (ceil(m / 2), 3)
    a = full[:, 0] | ((full[:, 1] & 15) << 8)
    b = (full[:, 1] >> 4) | (full[:, 2] << 4)
    return torch.stack([a, b], dim=1).reshape(-1)[:m]


def pack(idx: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, weight: float, bits: int) -> torch.Tensor:
    """One rank's payload as uint8: ``[c*k 12-bit indices | values | c float32 scales | float32 weight]``."""
    parts = [_pack_indices(idx.reshape(-1))]
    if bits == 32:
        parts.append(codes.reshape(-1).contiguous().view(torch.uint8))
    else:
        parts += [_pack_bits(codes.reshape(-1), bits), scale.contiguous().view(torch.uint8)]
    parts.append(torch.tensor([weight], dtype=torch.float32, device=idx.device).view(torch.uint8))
    return torch.cat(parts)


def unpack(payload: torch.Tensor, chunks: int, k: int, bits: int
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``pack``'s inverse for one rank: (indices (c, k) int64, dequantized values (c, k), weight)."""
    m = chunks * k
    at = index_bytes(m)
    # Slices are copied before their views: a payload's fields (and a rank's payload inside the
    # gathered buffer) need not start at a multiple of 4 bytes.
    idx = _unpack_indices(payload[:at], m).view(chunks, k)  # (c, k)
    if bits == 32:
        vals = payload[at : at + 4 * m].clone().view(torch.float32).view(chunks, k)  # (c, k)
        at += 4 * m
    else:
        nbytes = math.ceil(m * bits / 8)
        codes = _unpack_bits(payload[at : at + nbytes], m, bits).view(chunks, k)  # (c, k)
        at += nbytes
        scale = payload[at : at + chunks * SCALE_BYTES].clone().view(torch.float32)  # (c,)
        at += chunks * SCALE_BYTES
        vals = dequantize(codes, scale, bits)
    weight = float(payload[at : at + WEIGHT_BYTES].clone().view(torch.float32)[0])
    return idx, vals, weight


def weighted_average(gathered: torch.Tensor, world_size: int, chunks: int, k: int, bits: int) -> torch.Tensor:
    """(N * payload bytes,) gathered payloads -> the weighted mean of the ranks' sparse contributions,
    dense (c * CHUNK_NUMEL,) float32. Ranks are added in rank order with ``scatter`` (unique indices
    per rank), so every rank computes the same bits, on any device."""
    total = torch.zeros(chunks, CHUNK_NUMEL, dtype=torch.float32, device=gathered.device)  # (c, C)
    part = torch.empty_like(total)  # (c, C) reused
    weights = 0.0
    for payload in gathered.view(world_size, -1):
        idx, vals, weight = unpack(payload, chunks, k, bits)
        part.zero_().scatter_(1, idx, vals)
        total.add_(part, alpha=weight)
        weights += weight
    if not weights > 0:
        raise ValueError(f"the ranks' token weights sum to {weights}; each rank must report > 0 tokens")
    return total.view(-1).div_(weights)
