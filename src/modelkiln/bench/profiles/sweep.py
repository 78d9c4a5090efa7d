"""Sweep to saturation: open-loop runs at rising rates until the server stops keeping up.

A step is saturated when the achieved throughput falls below ``keep_up`` of the
rate its arrivals really had, or more than ``max_error_rate`` of its requests failed. The sweep
multiplies the rate by ``factor`` after each step and always stops: at
saturation or after ``max_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelkiln.bench.results import LoadReport
from modelkiln.errors import ConfigError


@dataclass
class SweepResult:
    """Every step's summary, and the rate at which the server saturated (None: never)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    saturated_at: float | None = None
    max_throughput_rps: float = 0.0


def saturated(report: LoadReport, rate: float, keep_up: float, max_error_rate: float) -> bool:
    """Whether ``report`` (offered ``rate``) shows a server that fell behind or failed."""
    s = report.summary()
    if s["requests"] and s["errors"] / s["requests"] > max_error_rate:
        return True
    # Compare with the rate the arrivals really had (a short Poisson run deviates from ``rate``).
    last = max((r.scheduled or 0.0 for r in report.results), default=0.0)
    offered = (len(report.results) - 1) / last if last > 0 else rate
    return bool(s["throughput_rps"] < keep_up * offered)


def sweep(
    run_at: Callable[[float], LoadReport],
    start_rate: float,
    *,
    factor: float = 2.0,
    max_steps: int = 8,
    keep_up: float = 0.9,
    max_error_rate: float = 0.05,
) -> SweepResult:
    """Run ``run_at(rate)`` at ``start_rate * factor**k`` until saturation (bounded)."""
    if start_rate <= 0 or factor <= 1 or max_steps < 1:
        raise ConfigError(
            f"sweep needs start_rate > 0, factor > 1, max_steps >= 1 "
            f"(got {start_rate}, {factor}, {max_steps})",
            hint="e.g. --rate 1 for the first step",
        )
    out = SweepResult()
    rate = start_rate
    for _ in range(max_steps):
        report = run_at(rate)
        step = report.summary() | {"offered_rps": rate}
        out.steps.append(step)
        out.max_throughput_rps = max(out.max_throughput_rps, step["throughput_rps"])
        if saturated(report, rate, keep_up, max_error_rate):
            out.saturated_at = rate
            break
        rate *= factor
    return out
