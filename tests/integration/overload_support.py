"""Pieces of the overload / keep-alive tests: a model-bound encoder and a flood of lean clients."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_support import free_port  # noqa: F401  (puts tests/unit/serve on sys.path)

from http_helpers import tiny_encoder_dir  # isort: skip

from modelkiln.bench.backends.openai import Client
from modelkiln.bench.results import RequestResult

WORDS = ["def", "add", "x", "y", "class", "a", "pass", "hello", "world", "b", "c", "d"]


def save_slow_encoder(path: Path) -> Path:
    """The tiny encoder's tokenizer on a wider BERT (4 x 256): ~10 ms of CPU per 60-token input.

    Wide enough that the model, not HTTP, is the bottleneck of a loopback flood.
    """
    import torch
    from transformers import BertConfig, BertModel

    shutil.copytree(tiny_encoder_dir(), path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=64,
    )  # fmt: skip
    for f in path.glob("*.safetensors"):
        f.unlink()
    BertModel(cfg).eval().save_pretrained(path)
    return path


def text(i: int, words: int = 60) -> str:
    """A distinct input of ``words`` vocabulary words (+ 2 special tokens)."""
    return " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(words))


@dataclass
class Flood:
    """What a flood saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies_ok: list[float] = field(default_factory=list)
    sent: int = 0


async def flood(url: str, clients: int, seconds: float, model: str = "enc") -> Flood:
    """``clients`` closed-loop clients that resend at once on 429, for ``seconds``."""
    client = Client(url, None, timeout_s=60.0, max_connections=clients)
    out = Flood()
    origin = time.perf_counter()
    stop = origin + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            result = RequestResult(start=0.0)
            body = {"model": model, "input": text(w * 10_000 + i)}
            i += 1
            out.sent += 1
            try:
                t0 = await client.post("/v1/embeddings", body, result, origin)
            except Exception as exc:  # what the test counts: any transport failure
                out.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            out.statuses[result.status] = out.statuses.get(result.status, 0) + 1
            if result.status == 200:
                out.latencies_ok.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(worker(w) for w in range(clients)))
    finally:
        client.close()
    return out
