"""Text from a trained model: prompts encoded and continuations decoded with the checkpoint's own
tokenizer (bytes or BPE; the demo's samples; serving loads checkpoints the same way, with
workers/checkpoint.py ``load_model`` and ``load_tokenizer_for``)."""

from __future__ import annotations

import torch

from workers.data import EOS_TOKEN
from workers.data.tokenizer import Tokenizer
from workers.moe.model import MoETransformer

DEFAULT_PROMPTS = ("def ", "import ", "class ")
SAMPLE_TOKENS = 160
TEMPERATURE = 0.8


def sample_text(model: MoETransformer, tokenizer: Tokenizer, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                max_tokens: int = SAMPLE_TOKENS, temperature: float = TEMPERATURE, seed: int = 0) -> list[str]:
    """One continuation per prompt (prompt included), cut at the end-of-sequence token."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    samples = []
    for prompt in prompts:
        ids = tokenizer.encode_docs([prompt.encode()])[0][:-1].tolist()  # without the EOS that ends a document
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, prompt_len)
        with torch.no_grad():
            out = model.generate(idx, max_new_tokens=max_tokens, temperature=temperature)[0].tolist()
        if EOS_TOKEN in out:
            out = out[: out.index(EOS_TOKEN)]
        samples.append(tokenizer.decode(out))
    return samples
