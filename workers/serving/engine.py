"""Batched generation with a KV cache: rows (one per prompt and choice) of different lengths and
sampling settings generate together, one forward per token over the rows still running.

Why rows do not change each other's output: in eval mode the MoE routes every token on its own (no
capacity dropping), each row attends only to its own cache slots, and each row samples from its own
seeded ``torch.Generator``; so a row's tokens are those it gets alone (the same forward up to
floating-point rounding of differently shaped matmuls).

Shape suffixes: B rows in the batch, L positions, V vocabulary.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from workers.data import EOS_TOKEN
from workers.data.tokenizer import ByteTokenizer
from workers.moe.model import KVCache, MoETransformer
from workers.serving.prefix import PrefixCache
from workers.serving.tokens import token_pieces

# The byte tokenizer's pieces (id -> its byte), what a stream decodes when it is given none.
BYTE_PIECES = token_pieces(ByteTokenizer(), 256)


@dataclass(frozen=True)
class RowRequest:
    """One completion to generate; validated by the caller (fits the model's context)."""

    tokens: tuple[int, ...]  # the prompt, starting with EOS_TOKEN (a document's start)
    max_tokens: int
    temperature: float  # <= 0: greedy
    top_p: float
    stop: tuple[str, ...]
    seed: int
    # None: no log-probabilities; k: the sampled token's and the k most likely tokens' at each step.
    logprobs: int | None = None
    enqueued_s: float = field(default_factory=time.perf_counter)  # for time to first token
    # Set by the route when its caller has gone (a dropped stream): the row leaves at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


@dataclass(frozen=True)
class Chunk:
    """What one row produced in one step: text safe to show (complete characters, no part of a stop
    sequence), the tokens generated so far, and why it ended (None while it runs)."""

    text: str
    completion_tokens: int
    finish_reason: str | None  # "stop" (EOS or a stop sequence) or "length" (max_tokens)
    token: int = -1  # the token this step sampled
    logprob: float | None = None  # its natural-log probability (rows that asked for logprobs)
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and theirs, most likely first


class TextStream:
    """Tokens -> text as they come: each token's bytes (``pieces[token]``, workers/serving/tokens.py)
    go through an incremental UTF-8 decoder, which holds back an incomplete character (a byte-level
    BPE token may end inside one); any tail that could still become a stop sequence is held back
    too, and the stream ends at the first stop sequence (which is not shown)."""

    def __init__(self, stop: tuple[str, ...], pieces: Sequence[bytes] = BYTE_PIECES):
        self.stop = tuple(s for s in stop if s)
        self.pieces = pieces
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.decode(self.pieces[token])
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = max((k for s in self.stop for k in range(1, min(len(s) - 1, len(self.pending)) + 1)
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail once the row ends without a stop sequence."""
        out, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return out


def sample_token(logits_V: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature <= 0, else nucleus sampling (the smallest set of tokens whose
    probability reaches top_p) from the row's own generator."""
    if temperature <= 0:
        return int(logits_V.argmax())
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_V, order_V = probs_V.sort(descending=True)  # (V,)
        outside_V = sorted_V.cumsum(0) - sorted_V >= top_p  # (V,) mass before it already reaches top_p
        probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V.masked_fill(outside_V, 0.0))
    return int(torch.multinomial(probs_V, 1, generator=generator))


class BatchGeneration:
    """Generates a fixed set of rows together; ``step()`` until ``done``. The first step prefills
    every prompt in one right-padded forward (from the end of its cached prefix, with ``prefixes``:
    workers/serving/prefix.py); later steps feed one token per running row. Rows leave the batch
    (and the cache) as soon as they finish or are cancelled. ``pieces``: every id's bytes, from the
    checkpoint's tokenizer (``token_pieces``); the byte tokenizer's by default."""

    def __init__(self, model: MoETransformer, rows: list[RowRequest], pieces: Sequence[bytes] | None = None,
                 prefixes: PrefixCache | None = None):
        self.model = model
        self.prefixes = prefixes
        self.rows = rows
        self.generators = [torch.Generator().manual_seed(r.seed) for r in rows]
        pieces = pieces if pieces is not None else token_pieces(ByteTokenizer(), model.config.vocab_size)
        self.streams = [TextStream(r.stop, pieces) for r in rows]
        self.generated = [0] * len(rows)
        self.running = list(range(len(rows)))  # indices into rows, in cache order
        self.cache: KVCache | None = None
        self.last_tokens: list[int] = []
        self.first_token_s: dict[int, float] = {}  # row -> seconds from enqueue to its first token

    @property
    def done(self) -> bool:
        return not self.running

    @torch.no_grad()
    def _logits(self) -> Tensor:
        """(B, V) next-token logits of the running rows."""
        device = self.model.tok_emb.weight.device
        if self.cache is None:
            return self._prefill(device)
        idx_B1 = torch.tensor(self.last_tokens, device=device)[:, None]  # (B, 1)
        return self.model(idx_B1, self.cache)[:, -1]  # (B, V)

    def _prefill(self, device: torch.device) -> Tensor:
        """Every prompt in one right-padded forward, each from the end of its longest cached
        prefix (``prefixes``) whose keys and values are copied in first; then the prompts' blocks
        are cached for later requests."""
        prompts = [self.rows[i].tokens for i in self.running]
        self.cache = self.model.new_cache(len(prompts))
        starts = [0] * len(prompts)
        for b, tokens in enumerate(prompts):
            hit = self.prefixes.lookup(tokens) if self.prefixes is not None else None
            if hit is not None:
                starts[b], k_NHPC, v_NHPC = hit
                self.cache.k_NBHLC[:, b, :, :starts[b]] = k_NHPC
                self.cache.v_NBHLC[:, b, :, :starts[b]] = v_NHPC
        while True:  # a padded suffix may not run past the context: such rows start from 0
            width = max(len(t) - s for t, s in zip(prompts, starts, strict=True))
            over = [b for b, s in enumerate(starts) if s and s + width > self.model.config.max_seq_len]
            if not over:
                break
            for b in over:
                starts[b] = 0
        padded = [list(t[s:]) + [EOS_TOKEN] * (width - len(t) + s) for t, s in zip(prompts, starts, strict=True)]
        self.cache.lengths_B = torch.tensor(starts, device=device)  # (B,)
        logits_BLV = self.model(torch.tensor(padded, device=device), self.cache)  # (B, L, V)
        self.cache.lengths_B = torch.tensor([len(t) for t in prompts], device=device)  # the padding is free again
        if self.prefixes is not None:
            for b, tokens in enumerate(prompts):
                self.prefixes.store(tokens, self.cache.k_NBHLC[:, b], self.cache.v_NBHLC[:, b])
        last_B = torch.tensor([len(t) - s - 1 for t, s in zip(prompts, starts, strict=True)], device=device)  # (B,)
        return logits_BLV[torch.arange(len(prompts), device=device), last_B]  # (B, V)

    def _drop_cancelled(self) -> None:
        """Rows whose caller has gone leave the batch and the cache before the next forward."""
        keep_b = [b for b, i in enumerate(self.running) if not self.rows[i].cancelled.is_set()]
        if len(keep_b) == len(self.running):
            return
        if self.cache is not None and keep_b:
            self.cache.keep(torch.tensor(keep_b, device=self.cache.lengths_B.device))
            self.last_tokens = [self.last_tokens[b] for b in keep_b]
        self.running = [self.running[b] for b in keep_b]

    def step(self) -> dict[int, Chunk]:
        """One token for every running row: row index -> its chunk. Finished and cancelled rows leave."""
        self._drop_cancelled()
        if not self.running:
            return {}
        logits_BV = self._logits().float().cpu()  # (B, V)
        wanted = any(self.rows[i].logprobs is not None for i in self.running)
        logp_BV = torch.log_softmax(logits_BV, dim=-1) if wanted else None  # (B, V)
        now = time.perf_counter()
        out: dict[int, Chunk] = {}
        keep_b: list[int] = []
        next_tokens: list[int] = []
        for b, i in enumerate(self.running):
            row, stream = self.rows[i], self.streams[i]
            token = sample_token(logits_BV[b], row.temperature, row.top_p, self.generators[i])
            self.generated[i] += 1
            self.first_token_s.setdefault(i, now - row.enqueued_s)
            text = "" if token == EOS_TOKEN else stream.push(token)
            finish = "stop" if token == EOS_TOKEN or stream.stopped else (
                "length" if self.generated[i] >= row.max_tokens else None)
            if finish == "length" or token == EOS_TOKEN:
                text += stream.flush()
            out[i] = Chunk(text, self.generated[i], finish, token, *_token_logprobs(logp_BV, b, token, row.logprobs))
            if finish is None:
                keep_b.append(b)
                next_tokens.append(token)
        if len(keep_b) < len(self.running) and keep_b:
            self.cache.keep(torch.tensor(keep_b, device=self.cache.lengths_B.device))
        self.running = [self.running[b] for b in keep_b]
        self.last_tokens = next_tokens
        return out


class Rows:
    """One request's rows (prompt-major, ``n`` per prompt) and what they produce, gathered."""

    def __init__(self, rows: list[RowRequest], prompts: list[list[int]]):
        self.rows, self.prompts = rows, prompts
        self.texts = [""] * len(rows)
        self.finish: list[str | None] = [None] * len(rows)
        self.used = [0] * len(rows)
        self.scored: list[list[tuple[int, float | None, tuple]]] = [[] for _ in rows]

    def add(self, i: int, chunk: Chunk) -> None:
        self.texts[i] += chunk.text
        self.finish[i], self.used[i] = chunk.finish_reason, chunk.completion_tokens
        self.scored[i].append((chunk.token, chunk.logprob, chunk.top))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _token_logprobs(logp_BV: Tensor | None, b: int, token: int, k: int | None
                    ) -> tuple[float | None, tuple[tuple[int, float], ...]]:
    """Row b's log-probability of ``token`` and its k most likely tokens, or (None, ()) if not asked."""
    if logp_BV is None or k is None:
        return None, ()
    top = logp_BV[b].topk(k) if k else None
    return float(logp_BV[b, token]), tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if k else ()


@torch.no_grad()
def prompt_logprobs(model: MoETransformer, tokens: Sequence[int], k: int
                    ) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """For each token after the first (the EOS a prompt starts with): log p(token | those before)
    and the k most likely tokens there, from one forward (an echoed prompt's scores)."""
    device = model.tok_emb.weight.device
    idx_1L = torch.tensor([list(tokens)], device=device)  # (1, L)
    logp_LV = torch.log_softmax(model(idx_1L)[0, :-1].float(), dim=-1).cpu()  # (L - 1, V)
    return [(float(logp_LV[t, tok]), _token_logprobs(logp_LV, t, tok, k)[1]) for t, tok in enumerate(tokens[1:])]
