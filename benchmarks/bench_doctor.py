"""Hardware baseline from ``kiln doctor``: peak matmul throughput per dtype.

Run: ``.venv/bin/python benchmarks/bench_doctor.py`` (part of ``make bench``).
Writes the ``doctor`` section of docs/BENCHMARKS.md and docs/img/doctor.png.
"""

from __future__ import annotations

from pathlib import Path

from _record import machine_line, update_section

from modelkiln.doctor import plot_doctor, run_doctor

IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "doctor.png"


def main() -> None:
    """Measure with a generous time budget so slow paths are timed near full size."""
    report = run_doctor(measure=True, matmul_size=2048, repeats=5, budget_s=20.0)
    IMG.parent.mkdir(parents=True, exist_ok=True)
    plot_doctor(report, IMG)
    cpu = report.cpu
    flags = ", ".join(f for f, on in cpu.flags.items() if on) or "none of the tracked ones"
    rows = []
    for t in report.throughput:
        ratio = report.speedup(t.dtype, t.device)
        value = f"{t.value:.1f}" if t.value is not None else "n/a"
        rows.append(
            f"| {t.device} | {t.dtype} | {value} {t.unit} | {t.size or ''} | "
            f"{f'{ratio:.3f}x' if ratio is not None else ''} | {t.note or ''} |"
        )
    md = "\n".join(
        [
            "## Hardware baseline (`kiln doctor`)",
            "",
            "Command: `.venv/bin/python benchmarks/bench_doctor.py` "
            "(same measurement as `kiln doctor --plot doctor.png`).",
            "",
            machine_line(),
            f"CPU: {cpu.model}; torch capability `{cpu.torch_capability}`; flags: {flags}.",
            "",
            "| device | dtype | peak matmul | n | vs fp32 | note |",
            "|---|---|---:|---:|---:|---|",
            *rows,
            "",
            f"Verdict: {report.summary_line()}",
            "",
            "![doctor throughput](img/doctor.png)",
        ]
    )
    update_section("doctor", md)
    print(md)


if __name__ == "__main__":
    main()
