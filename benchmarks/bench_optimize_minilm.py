"""MiniLM optimization variants side by side: speed, size and code-search quality; what auto picks.

all-MiniLM-L6-v2 as fp32 eager (baseline), bf16, torchao int8 dynamic, ONNX
Runtime fp32 and ONNX Runtime dynamic int8, 128 tokens at batch 1 and 32,
2 threads, interleaved timing rounds. Quality: code-search MRR@10 on held-out
stdlib docstring -> code pairs (the same miner and hash split as
bench_code_search.py) and its ratio to fp32. Writes the ``optimize-minilm``
section of docs/BENCHMARKS.md.

    python benchmarks/bench_optimize_minilm.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads collapse (~15x slower) when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from bench_code_search import mine_stdlib

METHODS = ["torch-fp32", "torch-bf16", "torch-int8-dynamic", "onnx-fp32", "onnx-int8-dynamic"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the summary as JSON; update docs/BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500, help="held-out pairs for MRR@10")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of top modules")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="timing budget per shape")
    parser.add_argument("--out", type=Path, default=None, help="keep the variants here")
    parser.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)

    import datasets
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from modelkiln.optimize import OptimizeConfig, code_search_metric, optimize
    from modelkiln.train.encoder import load_encoder, minilm_path, pair_texts

    torch.set_num_threads(args.threads)
    _, eval_rows, n_held = mine_stdlib(args.held_out)
    docs, codes = pair_texts(datasets.Dataset.from_list(eval_rows), args.pairs, seed=0)
    _, tokenizer = load_encoder("minilm", 128)
    metric = code_search_metric(docs, codes, tokenizer, max_length=128, batch_size=32)
    cfg = OptimizeConfig(
        methods=METHODS,
        target="auto",
        bench={
            "batch_sizes": [1, 32],
            "seq_lengths": [128],
            "threads": args.threads,
            "min_runs": 3,
            "max_runs": 15,
            "max_seconds": args.max_seconds,
        },
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "optimize"
        result = optimize(minilm_path(), cfg, metric, out)
        layer_md = (out / "variants" / "onnx-int8-dynamic" / "layer_error.md").read_text()
    seconds = time.perf_counter() - started
    summary = {
        "chosen": result.chosen,
        "seconds": round(seconds, 1),
        "pairs": len(codes),
        "held_out_modules": n_held,
        "variants": {
            n: {"status": c.status, "reasons": c.reasons, "quality": c.quality,
                "speedup": c.speedup, "size_mb": round(c.size_bytes / 1e6, 1),
                "parity_worst_snr_db": (c.parity or {}).get("worst_snr_db"),
                "latency": [{k: t[k] for k in ("batch", "p50_ms", "p95_ms", "items_per_s", "aborted")}
                            for t in c.latency]}
            for n, c in result.cards.items()
        },
    }  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    if not args.no_record:
        command = shlex.join(["python", "benchmarks/bench_optimize_minilm.py", *sys.argv[1:]])
        update_section("optimize-minilm", render(result, summary, layer_md, command))
    return 0


def render(result: Any, s: dict[str, Any], layer_md: str, command: str) -> str:
    """The markdown section of this benchmark."""
    parity = "\n".join(
        f"| `{n}` | {v['parity_worst_snr_db']:.1f} | {v['status']} | {'; '.join(v['reasons'])} |"
        for n, v in s["variants"].items()
    )
    worst = "\n".join(layer_md.strip().splitlines()[4:11])
    build = result.cards["onnx-int8-dynamic"].build
    bits = 7 if build.get("reduce_range") else 8
    int8_note = (
        f"ORT int8: per-channel {bits}-bit weights, uint8 activations quantized per call"
        + (
            " (reduce_range, set automatically because this CPU has no VNNI / AMX-int8: ORT's "
            "AVX2 u8s8 kernel, VPMADDUBSW, can saturate with 8-bit weights)."
            if bits == 7
            else "."
        )
    )
    return f"""## Optimize: all-MiniLM-L6-v2 variants, 128 tokens (speed, size, code-search quality)

`{command}`

`modelkiln.optimize.optimize(target="auto")` on the packaged all-MiniLM-L6-v2: every variant
built, reloaded and checked against fp32, timed side by side (interleaved rounds, batch 1 and
32 x 128 tokens, {result.cards["torch-fp32"].machine["threads"]} threads), then code-search
MRR@10 on {s["pairs"]} held-out stdlib docstring -> code pairs ({s["held_out_modules"]} held-out
top-level modules; each docstring ranks its code among all {s["pairs"]}). Whole run
{s["seconds"]:.0f} s. **auto picked `{s["chosen"]}`.**

{result.table}
{int8_note}

A variant is stopped (and never chosen) once it runs 3x slower than fp32; its MRR is then not
measured (it would take minutes) and its closeness to fp32 is the parity SNR below, measured on
real docstring / code batches.

| variant | worst parity SNR dB | status | why |
|---|---|---|---|
{parity}

Worst layers of the int8 error report (ORT scheme, fake-quantized on the same real batches):

{worst}

{machine_line()}
"""


if __name__ == "__main__":
    sys.exit(main())
