"""SLO search: the highest request rate whose run meets an SLO, with an interval.

Doubles the rate from ``start_rate`` until a run fails the SLO (bracket), then
bisects ``iterations`` times. Every probed rate is kept with its bootstrap
verdicts: a rate *surely passes* when the 95 % interval of every target lies
under its bound, and *surely fails* when one target's interval lies above. The
reported interval runs from the highest surely-passing rate to the lowest
surely-failing one: the rates between cannot be told apart from noise with the
requests sent. The search always stops (at most ``max_doublings + iterations``
runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelkiln.bench.results import LoadReport
from modelkiln.bench.slo import SLOSpec


@dataclass
class SearchResult:
    """The best rate, its interval, and every probe."""

    best_rate: float | None
    ci_low: float | None
    ci_high: float | None
    probes: list[dict[str, Any]] = field(default_factory=list)


def _probe(run_at: Callable[[float], LoadReport], slo: SLOSpec, rate: float) -> dict[str, Any]:
    report = run_at(rate)
    verdict = slo.evaluate(report)
    s = report.summary(slo.per_request())
    ok = slo.met(report)
    return {
        "rate": rate,
        "ok": ok,
        "surely_ok": ok and all(v.get("surely_ok", False) for v in verdict.values()),
        "surely_failed": (not ok and s["errors"] > 0)
        or any(v.get("surely_failed", False) for v in verdict.values()),
        "slo": verdict,
        "throughput_rps": s["throughput_rps"],
        "goodput_rps": s["goodput_rps"],
    }


def search_rate(
    run_at: Callable[[float], LoadReport],
    slo: SLOSpec,
    start_rate: float = 1.0,
    *,
    max_doublings: int = 8,
    iterations: int = 4,
) -> SearchResult:
    """The highest rate meeting ``slo`` (None when even ``start_rate`` fails)."""
    probes = [_probe(run_at, slo, start_rate)]
    lo, hi = (start_rate, None) if probes[0]["ok"] else (None, start_rate)
    rate = start_rate
    for _ in range(max_doublings if lo is not None else 0):
        rate *= 2
        probes.append(_probe(run_at, slo, rate))
        if not probes[-1]["ok"]:
            hi = rate
            break
        lo = rate
    if lo is None and hi is not None:  # even the first failed: look below it
        for _ in range(iterations):
            rate /= 2
            probes.append(_probe(run_at, slo, rate))
            if probes[-1]["ok"]:
                lo = rate
                break
    if lo is not None and hi is not None:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            probes.append(_probe(run_at, slo, mid))
            lo, hi = (mid, hi) if probes[-1]["ok"] else (lo, mid)
    sure_ok = [p["rate"] for p in probes if p["surely_ok"]]
    sure_bad = [p["rate"] for p in probes if p["surely_failed"]]
    return SearchResult(
        best_rate=lo,
        ci_low=max(sure_ok) if sure_ok else None,
        ci_high=min(sure_bad) if sure_bad else None,
        probes=sorted(probes, key=lambda p: p["rate"]),
    )
