"""Offline data + tokenizer stages on the real stdlib corpus: time and figures.

Run: ``.venv/bin/python benchmarks/bench_data.py`` (part of ``make bench``).
Builds ``data`` and ``tokenizer`` with the quickstart config into a temporary
runs directory (forced, no cache) and writes the ``data`` section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _record import machine_line, update_section

from modelkiln.config import load_config
from modelkiln.pipeline import run_pipeline
from modelkiln.report import stage_seconds

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    """Run the two stages from scratch and record their figures."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "configs" / "quickstart.yaml",
            named={"runs_dir": tmp, "stages": ["data", "tokenizer"]},
        )
        start = time.perf_counter()
        result = run_pipeline(cfg, force=True, report=None)
        total = time.perf_counter() - start
        t0 = time.perf_counter()
        again = run_pipeline(cfg, report=None)
        cached = time.perf_counter() - t0
        data = result.outcome("data").artifact
        tok = result.outcome("tokenizer").artifact
        assert data is not None and tok is not None
        assert [o.status for o in again.outcomes] == ["cached", "cached"]
        dm, tm = data.metrics, tok.metrics
    rows = [
        f"| {s} | {dm[s]['modules']} | {dm[s]['files']} | {dm[s]['bytes']:,} | {dm[s]['tokens']:,} | "
        f"{dm[s].get('pairs', 0):,} | {tm['splits'][s]['tokens']:,} | {tm['splits'][s]['bytes_per_token']:.3f} |"
        for s in ("train", "validation", "test")
    ]
    md = "\n".join(
        [
            "## Offline data and tokenizer (stdlib corpus)",
            "",
            "Command: `.venv/bin/python benchmarks/bench_data.py` (the quickstart's `data` and "
            "`tokenizer` stages, forced).",
            "",
            machine_line(),
            "",
            f"- data stage: {stage_seconds(result.outcome('data')):.1f} s; tokenizer stage: "
            f"{stage_seconds(result.outcome('tokenizer')):.1f} s (BPE training "
            f"{tm['train_seconds']:.1f} s, the rest is the exact round-trip check of "
            f"{tm['roundtrip_files_checked']} files: {tm['roundtrip_failures']} failures); "
            f"both: {total:.1f} s.",
            f"- re-run with unchanged inputs: both stages cached in {cached:.2f} s.",
            f"- {dm['duplicates_removed']} exact duplicates removed; HumanEval problems: "
            f"{dm.get('humaneval_problems', 0)}.",
            "",
            "| split | modules | files | bytes | Python tokens | code-search pairs | BPE tokens | bytes/BPE token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    update_section("data", md)
    print(md)


if __name__ == "__main__":
    main()
