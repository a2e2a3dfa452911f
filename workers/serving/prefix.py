"""Reuse of the KV cache across requests that share a prompt prefix (a system prompt, few-shot
examples): a prompt's keys and values are kept in blocks of ``BLOCK_TOKENS`` tokens, each keyed by
its tokens and the block before it, so a later prompt starting with the same blocks copies them
into its cache and its prefill computes only the rest.

Why exact keys and not hashes: a collision would silently answer from another prompt's context.
Each block's key is (the id of the block before it, its own tokens), so a lookup costs one
dictionary probe per block. Blocks are evicted least recently used beyond ``max_bytes``; a block
whose parent was evicted is unreachable and goes in turn. Causal attention makes a prefix's keys and
values independent of what follows, so reused blocks give the same logits as a full prefill (up to
floating-point rounding of differently shaped matmuls).

Shape suffixes: N layers, H heads, P prefix positions, K block positions, C head width.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_TOKENS = 16  # prompt tokens per cached block


@dataclass
class _Block:
    id: int
    k_NHKC: Tensor
    v_NHKC: Tensor


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self.bytes = 0
        self.next_id = 1
        self.hit_tokens = 0  # prompt tokens whose prefill a hit saved, since the replica started

    def _walk(self, tokens: Sequence[int]) -> list[tuple[tuple[int, tuple[int, ...]], _Block]]:
        """The cached blocks ``tokens`` starts with, with their keys, in order; at least one token
        is left after them (its logits are the prefill's answer)."""
        found, parent = [], 0
        for end in range(BLOCK_TOKENS, len(tokens), BLOCK_TOKENS):
            key = (parent, tuple(tokens[end - BLOCK_TOKENS:end]))
            block = self.blocks.get(key)
            if block is None:
                break
            found.append((key, block))
            parent = block.id
        return found

    def lookup(self, tokens: Sequence[int]) -> tuple[int, Tensor, Tensor] | None:
        """(P, keys (N, H, P, C), values) of the longest cached prefix of ``tokens``, or None."""
        found = self._walk(tokens)
        if not found:
            return None
        for key, _ in found:
            self.blocks.move_to_end(key)
        prefix = len(found) * BLOCK_TOKENS
        self.hit_tokens += prefix
        return (prefix, torch.cat([b.k_NHKC for _, b in found], dim=2),  # (N, H, P, C)
                torch.cat([b.v_NHKC for _, b in found], dim=2))

    def store(self, tokens: Sequence[int], k_NHLC: Tensor, v_NHLC: Tensor) -> None:
        """Keeps the whole blocks of a prefilled prompt (``k/v``: its row of the KV cache) that are
        not cached yet; the last token stays out (see ``_walk``)."""
        parent = 0
        for end in range(BLOCK_TOKENS, len(tokens), BLOCK_TOKENS):
            key = (parent, tuple(tokens[end - BLOCK_TOKENS:end]))
            block = self.blocks.get(key)
            if block is None:
                k, v = k_NHLC[:, :, end - BLOCK_TOKENS:end].clone(), v_NHLC[:, :, end - BLOCK_TOKENS:end].clone()
                block = self.blocks[key] = _Block(self.next_id, k, v)
                self.next_id += 1
                self.bytes += 2 * k.numel() * k.element_size()
            self.blocks.move_to_end(key)
            parent = block.id
        while self.bytes > self.max_bytes and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= 2 * old.k_NHKC.numel() * old.k_NHKC.element_size()
