"""A checkpoint's tokenizer as the serving engine uses it: prompts in as token ids, and every id's
bytes (``token_pieces``) so generated text streams out token by token.

Why bytes per id rather than ``tokenizer.decode`` per token: a byte-level BPE token may hold part
of a UTF-8 character (the other part comes with the next token), and decoding one token at a time
would turn each part into U+FFFD. The engine's text stream instead feeds each token's bytes to an
incremental UTF-8 decoder, which holds a partial character back until it completes; the text of a
finished row is then exactly ``tokenizer.decode`` of its ids.
"""

from __future__ import annotations

import json

from workers.data import EOS_TOKEN
from workers.data.tokenizer import BYTE_VOCAB_SIZE, BpeTokenizer, ByteTokenizer, Tokenizer, TokenizerError


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A document's start (EOS, as in training) then the text's tokens. Raises UnicodeEncodeError
    for text that is not valid Unicode (a lone surrogate)."""
    ids = tokenizer.encode_docs([text.encode("utf-8")])[0][:-1]  # (n,) without the EOS ending a document
    return [EOS_TOKEN, *ids.tolist()]


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """At least the most UTF-8 bytes of text one token can stand for, so a text of more than
    ``n * max_token_bytes`` bytes (or characters: each is at least one byte) encodes to more than
    ``n`` tokens, known before encoding it. Byte-level BPE tokens are spelled one character per byte,
    so their UTF-8 length (up to 2 bytes per character) bounds the bytes they stand for; added tokens
    match their text literally."""
    if isinstance(tokenizer, ByteTokenizer):
        return 1
    return max(len(token.encode("utf-8")) for token in tokenizer.hf.get_vocab(with_added_tokens=True))


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, which ``tokenizers``' ByteLevel uses): each byte is one
    printable character; printable Latin-1 bytes stand for themselves, the other 68 bytes take the
    characters from U+0100 on, in byte order. Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(BYTE_VOCAB_SIZE) if b not in chars]
    chars.update({b: chr(BYTE_VOCAB_SIZE + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def _bpe_pieces(tokenizer: BpeTokenizer, vocab_size: int) -> list[bytes]:
    decoder = json.loads(tokenizer.to_json()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise TokenizerError(f"serving streams byte-level BPE tokenizers; this one decodes with {decoder.get('type')!r}")
    to_byte = _byte_level_chars()
    special = set(tokenizer.hf.get_added_tokens_decoder())
    pieces = []
    for i in range(vocab_size):
        token = tokenizer.hf.id_to_token(i)
        if token is None or i in special:  # beyond the tokenizer's ids (a larger model vocab), or EOS
            pieces.append(b"")
        elif any(c not in to_byte for c in token):
            raise TokenizerError(f"BPE token {i} ({token!r}) is not made of byte-level characters")
        else:
            pieces.append(bytes(to_byte[c] for c in token))
    return pieces


def token_pieces(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id below ``vocab_size`` (the model's) stands for; empty for EOS and for ids the
    tokenizer does not have (a model's vocabulary may be larger than its tokenizer's)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if 0 < i < BYTE_VOCAB_SIZE else b"" for i in range(vocab_size)]
    return _bpe_pieces(tokenizer, vocab_size)
