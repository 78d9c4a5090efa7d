"""The figures behind a check: one interval of both versions, the window means, the
evidence in a decision's numbers and reason (pure helpers of the controller)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from modelkiln.rollout import analysis
from modelkiln.rollout.spec import RolloutState
from modelkiln.rollout.stages import n_stages

MIN_BATCH = 5
"""Requests of each version a batch of the sequential tests needs (see Interval.batch_ready)."""


@dataclass
class Interval:
    """What both versions did since the last check, and the tests' evidence since it was
    saved (kept in memory: a restart loses at most one check interval)."""

    key: tuple[float, int] = (0.0, 0)
    """(rollout start, stage) the figures belong to."""
    cand: analysis.ArmWindow = field(default_factory=analysis.ArmWindow)
    base: analysis.ArmWindow = field(default_factory=analysis.ArmWindow)
    pairs: list[float] = field(default_factory=list)
    tests: dict[str, list[float]] | None = None
    """The tests' evidence since the last save (None: the saved state is current)."""
    stage_requests: int = 0
    last_analysis: float = 0.0
    batch_cand: analysis.ArmWindow = field(default_factory=analysis.ArmWindow)
    batch_base: analysis.ArmWindow = field(default_factory=analysis.ArmWindow)
    batch_pairs: list[float] = field(default_factory=list)
    """Figures not fed to the tests yet (see :meth:`batch_ready`)."""

    def batch_ready(self, due: bool) -> bool:
        """Whether to feed the pending batch to the tests: both versions have
        :data:`MIN_BATCH` requests (or, at a check, one each).

        A two-arm test learns nothing from a batch where one version has no request, and
        requests finish at different speeds (a failing one fast, a slow one late), so a
        fixed short interval often holds one version only. The batch ends on request counts,
        never on outcomes, so under A/A the tests stay valid.
        """
        n = min(self.batch_cand.requests, self.batch_base.requests)
        return n >= MIN_BATCH or (due and n > 0)

    def new_batch(self) -> None:
        """Forget the batch just fed to the tests."""
        self.batch_cand, self.batch_base = analysis.ArmWindow(), analysis.ArmWindow()
        self.batch_pairs = []

    def new_check(self) -> None:
        """Start the next check interval's figures (the saved state is current now)."""
        self.cand, self.base, self.pairs = analysis.ArmWindow(), analysis.ArmWindow(), []
        self.tests = None


def decisive(state: RolloutState, failing: list[str], acc: Interval) -> bool:
    """A test crossed its bound and the check would roll back: do not wait for it.

    An absolute SLO test only rolls back while the baseline meets the SLO (else it holds),
    judged here on this interval alone; the check then judges on its window.
    """
    if any(not f.startswith("slo_") for f in failing):
        return True
    if not failing:
        return False
    now = figures(acc.cand, acc.base, acc.pairs)
    c = state.spec.canary
    return now["base_error_rate"] <= c.max_error_rate and now["base_p95_ms"] <= (c.max_latency_ms)


def figures(
    cand: analysis.ArmWindow, base: analysis.ArmWindow, pairs: list[float]
) -> dict[str, float]:
    def rate(a: analysis.ArmWindow) -> float:
        return a.errors / a.requests if a.requests else 0.0

    def p95(a: analysis.ArmWindow) -> float:
        q = analysis.quantile(a.latency_ms, 0.95)
        return 0.0 if math.isnan(q) else q

    return {
        "cand_requests": cand.requests, "base_requests": base.requests,
        "cand_error_rate": rate(cand), "base_error_rate": rate(base),
        "cand_p95_ms": p95(cand), "base_p95_ms": p95(base),
        "agreement": sum(pairs) / len(pairs) if pairs else 1.0, "pairs": len(pairs),
    }  # fmt: skip


def numbers_of(state: RolloutState, tests: dict[str, analysis.SequentialTest]) -> dict[str, Any]:
    keys = state.window[-1].keys() if state.window else []
    mean = {k: sum(w[k] for w in state.window) / len(state.window) for k in keys}
    bound = analysis.log_bound(state.spec.analysis, n_stages(state.spec))
    return {
        "last": state.window[-1] if state.window else {},
        "window_mean": mean,
        "log_evidence": {k: round(t.log_evidence, 3) for k, t in tests.items()},
        "bound": round(bound, 3),
    }


def evidence(names: list[str], numbers: dict[str, Any]) -> str:
    ev = numbers["log_evidence"]
    parts = [f"{n} log-LR {ev[n]:.2f} >= {numbers['bound']:.2f}" for n in names]
    m = numbers["window_mean"]
    return "; ".join(parts) + (
        f" (window: candidate errors {m['cand_error_rate']:.1%} vs {m['base_error_rate']:.1%},"
        f" p95 {m['cand_p95_ms']:.0f} vs {m['base_p95_ms']:.0f} ms)"
    )
