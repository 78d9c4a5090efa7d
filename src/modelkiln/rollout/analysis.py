"""SLO gates (*how to judge*): always-valid sequential tests of the candidate against the
baseline running at the same time, plus the handbook's absolute thresholds.

Why these tests (hand-written: scipy and statsmodels have no sequential tests):

- **Errors.** In one check interval, given the total number of errors ``m`` of both
  versions, the candidate's share of them is Binomial(m, n_c / (n_c + n_b)) when
  both have the same error rate, whatever that rate is and however it moves in
  time (both run at the same time). The likelihood ratio against "the candidate's
  rate is R times the baseline's" is then a test martingale, and so is a fixed
  mixture over several R; by Ville's inequality the chance that it *ever* crosses
  ``1/alpha`` under a quiet A/A rollout is at most ``alpha``, however many checks
  run. That is what keeps false rollbacks rare without a fixed sample size.
- **Latency / TTFT / TPOT tails.** The same test on "above the pooled p95 of this
  interval" (and, for latency, also on "above the pooled median"): under A/A the
  samples are exchangeable, so the candidate's count of exceedances is hypergeometric,
  which is dominated in convex order by the binomial (Hoeffding 1963); the ratio stays
  a supermartingale and the bound holds.
- **Absolute SLOs** (the handbook's ``max_error_rate`` / ``max_latency_ms``): one-sample
  mixture tests that the candidate's error rate is above ``max_error_rate``, and that
  more than ``1 - tail_quantile`` of its requests are slower than ``max_latency_ms``
  (p95 above the limit). A window mean over the limit alone only *holds* the ramp,
  so noise on a few requests cannot roll back.
- **Shadow agreement.** A one-sample mixture test that the share of shadow pairs
  agreeing less than ``min_agreement`` is above ``max_disagreement``.

The false-rollback budget ``alpha`` is split evenly (Bonferroni) over the tests and over
the stages; each stage starts its tests afresh.

**Restarts within a stage.** While both versions agree, every alternative's log-LR drifts
below zero (by the KL divergence per batch), so a fault that appears minutes into a stage
must first climb back (simulated: median 37 s instead of ~15 s after 5 min). Each test
therefore also starts fresh copies at fixed times in the stage (every ``restart_every_s``;
``ceil(dwell_s / restart_every_s)`` copies planned per stage) and updates every live copy
with the same batches. The evidence is the *uniform mixture* over (ratio, copy), a copy not
yet started counting as 1: a copy is a test martingale that stays 1 until a start time fixed
in advance (never chosen from the data), so the mixture is one too and Ville's bound holds
with the same ``log_bound``. This is at least as powerful as Bonferroni over the copies
(``max_j M_j >= copies * c`` implies ``mean_j M_j >= c``), costs a fault present at the
stage's start ``log(copies)`` nats, and lets a late fault start from a copy at most
``restart_every_s`` old (60 s: simulated, a 10 % error fault 5 min into a stage then rolls
back in a median 18-24 s, like one at the stage's start; 120 s: 23-26 s; 30 s costs the
stage-start case 2 s more). A stage held past its dwell starts no further copies (their weights
are spent).

**Batches and the analysis mirror.** The controller feeds the tests a batch as soon as both
versions have a few requests (``figures.MIN_BATCH``), about every second, and rolls back
the moment a bound is crossed (Ville's bound holds at every look, so looking often costs
nothing). Batches end on request counts, never on outcomes. During a canary the gateway
also runs each request on the version that did not serve it, at the same time
(``mirror_percent``), so at a 5 % step the candidate is measured on as many requests as
the baseline. A request and its twin are not independent (same prompt, same moment), but
under A/A swapping the two labels of a pair leaves their joint law unchanged: in a pair
where one exceeds and the other does not, the candidate is the one with probability 1/2,
and a pair where both (or neither) exceed multiplies the ratio by at most 1, so the
mixture stays a supermartingale while both arms have about as many requests (which the
mirror gives). The simulator draws twins independently; the real-server A/A run of
``benchmarks/bench_rollout_server.py`` exercises true pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from modelkiln.configbase import KilnModel

TESTS = (
    "errors", "latency", "latency_p50", "ttft", "tpot", "agreement", "slo_errors", "slo_latency",
)  # fmt: skip


class AnalysisConfig(KilnModel):
    """How a check judges the candidate (the AnalysisTemplate)."""

    alpha: float = Field(
        default=0.01, gt=0, lt=0.5, description="False-rollback budget for a whole A/A rollout."
    )
    ratios: list[float] = Field(
        default=[1.5, 2.0, 4.0, 8.0, 16.0],
        description="Alternatives mixed by the tests (candidate/baseline rate ratios).",
    )
    tail_quantile: float = Field(
        default=0.95, gt=0.5, lt=1, description="Pooled quantile the tail tests count above."
    )
    min_agreement: float = Field(
        default=0.9, ge=0, le=1, description="A shadow pair below this agreement disagrees."
    )
    max_disagreement: float = Field(
        default=0.02, gt=0, lt=0.5, description="Share of disagreeing pairs tolerated."
    )
    drift_action: Literal["hold", "rollback"] = Field(
        default="hold", description="What a drift alarm on the candidate does."
    )
    restart_every_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds between fresh copies of the tests within a stage (a fault that starts "
            "late in a stage is judged on a copy at most this old; ceil(dwell_s / this) "
            "copies per stage share the false-rollback budget). >= dwell_s: no restarts."
        ),
    )


@dataclass
class ArmWindow:
    """What one version did during one check interval."""

    requests: int = 0
    errors: int = 0
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)

    def merge(self, other: ArmWindow) -> None:
        """Add ``other`` (a later part of the same interval) to this window."""
        self.requests += other.requests
        self.errors += other.errors
        self.latency_ms += other.latency_ms
        self.ttft_ms += other.ttft_ms
        self.tpot_ms += other.tpot_ms


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _log_mean_exp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs) / len(xs))


@dataclass
class SequentialTest:
    """A mixture likelihood-ratio test martingale over alternatives and start times.

    ``log_lr`` holds one entry per ratio for each copy started so far (copy-major, so a
    one-copy test is one entry per ratio, as saved before restarts existed); ``copies`` is
    how many copies the stage plans, each weighted ``1 / copies``.
    """

    ratios: list[float]
    log_lr: list[float] = field(default_factory=list)
    copies: int = 1

    def __post_init__(self) -> None:
        if not self.log_lr:
            self.log_lr = [0.0] * len(self.ratios)
        self.copies = max(self.copies, self.started)  # never weigh a copy by more than 1/n

    @property
    def started(self) -> int:
        """Copies started so far."""
        return len(self.log_lr) // len(self.ratios)

    @property
    def log_evidence(self) -> float:
        """log of the mixture likelihood ratio (evidence that the candidate is worse)."""
        waiting = [0.0] * ((self.copies - self.started) * len(self.ratios))
        return _log_mean_exp(self.log_lr + waiting)

    def start_copies(self, due: int) -> None:
        """Start fresh copies until ``due`` (at most ``copies``) have started."""
        more = min(due, self.copies) - self.started
        if more > 0:
            self.log_lr += [0.0] * (more * len(self.ratios))

    def _add(self, step: list[float]) -> None:
        """Add one batch's per-ratio log-LR ``step`` to every live copy."""
        n = len(self.ratios)
        self.log_lr = [v + step[i % n] for i, v in enumerate(self.log_lr)]

    def update_two_arm(self, x_c: int, n_c: int, x_b: int, n_b: int) -> None:
        """Add one interval: ``x`` events out of ``n`` trials on candidate and baseline."""
        if n_c <= 0 or n_b <= 0 or x_c + x_b == 0:
            return  # no information about the ratio in this interval
        p0 = n_c / (n_c + n_b)
        step = []
        for r in self.ratios:
            p1 = r * n_c / (r * n_c + n_b)
            step.append(x_c * math.log(p1 / p0) + x_b * math.log((1 - p1) / (1 - p0)))
        self._add(step)

    def update_one_arm(self, x: int, n: int, p0: float) -> None:
        """Add ``x`` events in ``n`` trials against a null event rate ``p0``."""
        step = []
        for r in self.ratios:
            p1 = min(0.999, r * p0)
            step.append(x * math.log(p1 / p0) + (n - x) * math.log((1 - p1) / (1 - p0)))
        self._add(step)


def tail_counts(cand: list[float], base: list[float], q: float) -> tuple[int, int]:
    """How many samples of each arm lie above the pooled ``q`` quantile."""
    if not cand or not base:
        return 0, 0
    thr = quantile(cand + base, q)
    return sum(v > thr for v in cand), sum(v > thr for v in base)


def planned_copies(cfg: AnalysisConfig, dwell_s: float) -> int:
    """Copies of each test a stage of ``dwell_s`` seconds starts (one every
    ``restart_every_s``, the first at the stage's start)."""
    return max(1, math.ceil(dwell_s / cfg.restart_every_s))


def copies_due(cfg: AnalysisConfig, elapsed_s: float) -> int:
    """Copies that have started ``elapsed_s`` seconds into a stage (before the cap)."""
    return 1 + max(0, math.floor(elapsed_s / cfg.restart_every_s))


def new_tests(cfg: AnalysisConfig, copies: int = 1) -> dict[str, SequentialTest]:
    """A fresh test for every gate (its first copy started, ``copies`` planned)."""
    return {name: SequentialTest(list(cfg.ratios), copies=copies) for name in TESTS}


def update_tests(
    tests: dict[str, SequentialTest],
    cfg: AnalysisConfig,
    slo: tuple[float, float],
    windows: tuple[ArmWindow, ArmWindow],
    agreement: list[float],
    compare_latency: bool = True,
) -> None:
    """Feed one check interval to every test.

    Args:
        tests: the tests, updated in place.
        cfg: the analysis config.
        slo: ``(max_error_rate, max_latency_ms)``.
        windows: ``(candidate, baseline)`` of this interval.
        agreement: agreement scores of this interval's shadow pairs.
        compare_latency: run the relative latency tests. Off when one arm is mirrored
            traffic: a mirrored request runs after the served one, without streaming, under
            other load, so the two arms' latencies are not exchangeable (the absolute
            latency SLO still applies).
    """
    cand, base = windows
    tests["errors"].update_two_arm(cand.errors, cand.requests, base.errors, base.requests)
    for name, attr in (("latency", "latency_ms"), ("ttft", "ttft_ms"), ("tpot", "tpot_ms")):
        if not compare_latency:
            break
        c, b = getattr(cand, attr), getattr(base, attr)
        x_c, x_b = tail_counts(c, b, cfg.tail_quantile)
        tests[name].update_two_arm(x_c, len(c), x_b, len(b))
    # The median split sees a whole-distribution slowdown 10x sooner than the p95 tail.
    x_c, x_b = tail_counts(cand.latency_ms, base.latency_ms, 0.5) if compare_latency else (0, 0)
    tests["latency_p50"].update_two_arm(x_c, len(cand.latency_ms), x_b, len(base.latency_ms))
    if agreement:
        bad = sum(a < cfg.min_agreement for a in agreement)
        tests["agreement"].update_one_arm(bad, len(agreement), cfg.max_disagreement)
    max_err, max_ms = slo
    if max_err > 0:
        tests["slo_errors"].update_one_arm(cand.errors, cand.requests, max_err)
    slow = sum(v > max_ms for v in cand.latency_ms)
    tests["slo_latency"].update_one_arm(slow, len(cand.latency_ms), 1 - cfg.tail_quantile)


def log_bound(cfg: AnalysisConfig, stages: int = 1) -> float:
    """The rollback bound ``log(k * stages / alpha)``: Bonferroni over the k tests and over the
    stages (each stage restarts its tests, so quiet evidence from an earlier, smaller stage
    cannot slow the detection of a fault in a later one). The copies within a stage need no
    share: each test's evidence is already a mixture over them (see the module docstring)."""
    return math.log(len(TESTS) * max(1, stages) / cfg.alpha)


def failing_tests(
    tests: dict[str, SequentialTest], cfg: AnalysisConfig, stages: int = 1
) -> list[str]:
    """Names of the tests whose evidence crossed :func:`log_bound`."""
    bound = log_bound(cfg, stages)
    return [n for n, t in tests.items() if t.log_evidence >= bound]
