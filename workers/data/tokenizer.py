"""Tokenizers of the corpus: UTF-8 bytes (the default, vocab 256) or a byte-level BPE trained on a
sample of the corpus with Hugging Face ``tokenizers``.

Both share one contract, so shards, the trainer and checkpoints never care which one made them:
token 0 ends a document (for bytes it is NUL, which never occurs in a text file; for BPE it is the
special token ``<|endoftext|>``, which text cannot produce: literal occurrences in a file are
tokenized as plain text), ids fit in uint16 (BPE vocabularies are capped at 65,536), and
``to_json()`` / ``load_tokenizer(text)`` round-trip the tokenizer exactly, so a checkpoint can carry
the one it was trained with. A BPE's JSON is the ``tokenizers`` library's own ``tokenizer.json``
(loadable by ``tokenizers.Tokenizer.from_str`` anywhere); the byte tokenizer's is a small object
``{"kind": "bytes", ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

EOS_ID = 0
EOS_TEXT = "<|endoftext|>"
BYTE_VOCAB_SIZE = 256
MAX_VOCAB_SIZE = 65_536  # ids are stored as uint16
TOKEN_DTYPE = np.uint16


class TokenizerError(ValueError):
    """A tokenizer JSON that is not one of ours; the message says what was found."""


class ByteTokenizer:
    """UTF-8 bytes as tokens; NUL (0) ends a document."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = EOS_ID

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's tokens, ending with EOS: (len(doc) + 1,) uint16."""
        return [np.frombuffer(d + bytes([EOS_ID]), dtype=np.uint8).astype(TOKEN_DTYPE) for d in docs]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 < i < BYTE_VOCAB_SIZE).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id})


class BpeTokenizer:
    """A trained byte-level BPE (``tokenizers``); id 0 is ``<|endoftext|>``."""

    kind = "bpe"
    eos_id = EOS_ID

    def __init__(self, hf: Any):
        if hf.token_to_id(EOS_TEXT) != EOS_ID:
            raise TokenizerError(f"a BPE tokenizer here has {EOS_TEXT} as id {EOS_ID}; this one has "
                                 f"{hf.token_to_id(EOS_TEXT)}")
        hf.encode_special_tokens = True  # a file's literal "<|endoftext|>" is text, not a boundary
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    def encode_docs(self, docs: list[bytes]) -> list[np.ndarray]:
        encodings = self.hf.encode_batch([d.decode("utf-8") for d in docs], add_special_tokens=False)
        return [np.append(np.asarray(e.ids, dtype=TOKEN_DTYPE), TOKEN_DTYPE(EOS_ID)) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.hf.to_str()


Tokenizer = ByteTokenizer | BpeTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE with ``vocab_size`` ids (256 byte symbols, EOS, merges) trained on ``texts``.

    Byte-level: every byte has a symbol, so any text encodes without unknown tokens and decodes
    back exactly. GPT-2's pre-tokenizer regex splits words, numbers, punctuation and spaces first.
    """
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not BYTE_VOCAB_SIZE + 1 < vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size {vocab_size}: must be in ({BYTE_VOCAB_SIZE + 1}, {MAX_VOCAB_SIZE}]")
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(hf)


def load_tokenizer(json_text: str) -> Tokenizer:
    """The tokenizer ``to_json()`` wrote (from a manifest's tokenizer.json or a checkpoint)."""
    try:
        obj = json.loads(json_text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"tokenizer JSON does not parse: {e}") from None
    if isinstance(obj, dict) and obj.get("kind") == ByteTokenizer.kind:
        if obj.get("vocab_size") != BYTE_VOCAB_SIZE or obj.get("eos_id") != EOS_ID:
            raise TokenizerError(f"byte tokenizer with unexpected settings: {obj}")
        return ByteTokenizer()
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and obj["model"].get("type") == "BPE":
        from tokenizers import Tokenizer as HfTokenizer

        return BpeTokenizer(HfTokenizer.from_str(json_text))
    raise TokenizerError("tokenizer JSON is neither a byte tokenizer ({\"kind\": \"bytes\"}) "
                         "nor a tokenizers BPE (tokenizer.json with model.type BPE)")
