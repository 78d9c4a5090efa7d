"""``kiln bench compare``: runs side by side, with a bootstrap interval on each ratio.

The first file is the baseline. For every latency metric both runs measured,
the ratio of medians (run / baseline) gets a 95 % bootstrap interval over the
per-request (serve) or per-call (offline) samples. A change is called only when
the interval excludes 1: noise is not a regression. ``fail_if_slower=0.10``
fails when some ratio is above 1.10 *and* its interval lies above 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelkiln.bench.outputs.serialized import read_json
from modelkiln.bench.results import LoadReport, series
from modelkiln.bench.stats import bootstrap_ratio_ci
from modelkiln.errors import ArtifactError

__all__ = ["compare_runs", "samples", "slower_than"]

#: Serve metrics compared (all lower-is-better), from the per-request series.
SERVE_METRICS = ("response", "latency", "ttft_response", "tpot", "itl")


def samples(result: dict[str, Any]) -> dict[str, list[float]]:
    """Lower-is-better samples of one result, by metric name (ms)."""
    if "run" in result:
        data = series(LoadReport.from_dict(result["run"]).results)
        return {m: [v * 1000 for v in data[m]] for m in SERVE_METRICS if data[m]}
    if "rows" in result:
        return {
            f"{r['backend']} b{r['batch']} s{r['seq']} ms": list(r.get("times_ms") or [])
            for r in result["rows"]
            if r.get("times_ms")
        }
    raise ArtifactError(
        "not a kiln bench serve --json / offline.json result",
        hint="pass files written by kiln bench serve --json or bench offline",
    )


def compare_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per (run after the first, shared metric): medians, ratio, interval, verdict.

    Raises:
        ArtifactError: fewer than two files, a file that is no result, or nothing shared.
    """
    if len(paths) < 2:
        raise ArtifactError(
            "compare needs at least two result files", hint="kiln bench compare A.json B.json"
        )
    base = samples(read_json(paths[0]))
    rows = []
    for path in paths[1:]:
        other = samples(read_json(path))
        for metric in [m for m in base if m in other]:
            ratio, lo, hi = bootstrap_ratio_ci(base[metric], other[metric])
            verdict = "slower" if lo > 1 else "faster" if hi < 1 else "no significant change"
            rows.append(
                {
                    "run": path.stem,
                    "metric": metric,
                    "baseline": paths[0].stem,
                    "baseline_median": _median(base[metric]),
                    "median": _median(other[metric]),
                    "ratio": ratio,
                    "ci": [lo, hi],
                    "verdict": verdict,
                }
            )
    if not rows:
        raise ArtifactError(
            f"{paths[0]} and the other runs share no metric",
            hint="compare serve runs with serve runs, offline with offline",
        )
    return rows


def _median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))


def slower_than(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Rows whose ratio exceeds ``1 + threshold`` with an interval entirely above 1."""
    return [r for r in rows if r["ratio"] > 1 + threshold and r["ci"][0] > 1]
