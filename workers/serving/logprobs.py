"""Token log-probabilities in OpenAI's two shapes: the completions route's (``tokens``,
``token_logprobs``, ``top_logprobs`` as {token text: logprob}, ``text_offset``) and the chat route's
(a list of {token, bytes, logprob, top_logprobs}).

A token's text is its bytes (``token_pieces``) as UTF-8; a byte-level token that holds part of a
character is written ``bytes:\\xNN...`` instead, as OpenAI does, so no two tokens share a text in a
``top_logprobs`` map. The end-of-document token (empty bytes) reads ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from workers.serving.chat import ChoiceLogprobs, TokenLogprob, TopLogprob
from workers.serving.schemas import CompletionLogprobs

EOS_TEXT = "<|endoftext|>"
# (token id, its logprob, the most likely (id, logprob) pairs at that position)
Scored = tuple[int, float | None, Sequence[tuple[int, float]]]


def token_text(pieces: Sequence[bytes], token: int) -> str:
    piece = pieces[token]
    if not piece:
        return EOS_TEXT
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def completion_logprobs(pieces: Sequence[bytes], scored: Iterable[Scored], offset: int = 0,
                        with_top: bool = True) -> CompletionLogprobs:
    """The completions shape; ``offset``: the text offset of the first token (after echoed text)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[] if with_top else None, text_offset=[])
    for token, logprob, top in scored:
        text = token_text(pieces, token)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        if out.top_logprobs is not None:
            out.top_logprobs.append({token_text(pieces, t): lp for t, lp in top})
        out.text_offset.append(offset)
        offset += len(pieces[token].decode("utf-8", errors="replace"))
    return out


def chat_logprobs(pieces: Sequence[bytes], scored: Iterable[Scored]) -> ChoiceLogprobs:
    def top(t: int, lp: float) -> TopLogprob:
        return TopLogprob(token=token_text(pieces, t), bytes=list(pieces[t]), logprob=lp)

    return ChoiceLogprobs(content=[TokenLogprob(**top(token, logprob or 0.0).model_dump(),
                                                top_logprobs=[top(t, lp) for t, lp in alternatives])
                                   for token, logprob, alternatives in scored])
