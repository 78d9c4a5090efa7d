"""Tiny models saved to disk for monitor tests (2 layers, vocab ~300, built in-process)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

CODE = [
    "def add(x, y):\n    return x + y\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n",
    "for i in range(10):\n    print(i)\n",
    "import os\npath = os.path.join('a', 'b')\n",
    "def mul(a, b):\n    return a * b\n",
    "if x > 0:\n    y = x\nelse:\n    y = -x\n",
]
PROSE = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Yesterday we walked through the museum and admired the old paintings.",
    "Weather forecasts predict heavy snowfall across the northern mountains.",
]


@lru_cache(maxsize=1)
def _tokenizer() -> object:
    from modelkiln.config import TokenizerConfig
    from modelkiln.data.tokenizer import train_tokenizer

    return train_tokenizer(CODE * 30, TokenizerConfig(vocab_size=300))


def save_tiny_gpt2(path: Path) -> Path:
    """A 2-layer random GPT-2 with a code BPE tokenizer, saved with save_pretrained (fp32)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelkiln.data.tokenizer import save_tokenizer

    torch.manual_seed(0)
    special: dict[str, Any] = {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 1}
    tok: Any = _tokenizer()
    size = len(tok)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=size, **special)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    save_tokenizer(tok, path)
    return path


def code_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` code snippets recombined from CODE (held-out-like, same distribution)."""
    import random

    rng = random.Random(seed)
    return ["".join(rng.sample(CODE, 2)) for _ in range(n)]
