"""Text from a trained model: byte-level prompts in, decoded continuations out (the demo's samples;
serving loads checkpoints the same way, with workers/checkpoint.py ``load_model``)."""

from __future__ import annotations

import torch

from workers.data import EOS_TOKEN
from workers.moe.model import MoETransformer

DEFAULT_PROMPTS = ("def ", "import ", "class ")
SAMPLE_BYTES = 160
TEMPERATURE = 0.8


def sample_text(model: MoETransformer, prompts: tuple[str, ...] = DEFAULT_PROMPTS, max_bytes: int = SAMPLE_BYTES,
                temperature: float = TEMPERATURE, seed: int = 0) -> list[str]:
    """One continuation per prompt (prompt included), cut at the end-of-sequence token."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    samples = []
    for prompt in prompts:
        idx = torch.tensor([list(prompt.encode())], dtype=torch.long, device=device)  # (1, prompt_len)
        with torch.no_grad():
            out = model.generate(idx, max_new_tokens=max_bytes, temperature=temperature)[0].tolist()
        if EOS_TOKEN in out:
            out = out[: out.index(EOS_TOKEN)]
        samples.append(bytes(out).decode("utf-8", errors="replace"))
    return samples
