"""Backtest of predictive vs reactive autoscaling on a replayed request-rate trace.

The trace is declared synthetic (no production traffic exists here): a daily sine
pattern, an afternoon bump, random bursts and Gaussian noise, all from one seed. Every
policy sees only the past. A replica asked for at step t serves from step
t + 1 + ``startup_steps`` (image pull + model load) and costs replica-seconds from the
moment it is asked for; a removed replica stops at once (starting ones are cancelled
first, as a Deployment scaling down does).

- reactive: the Kubernetes HPA rule on utilization (desired = ceil(current x
  utilization / target), 10 % tolerance, scale-up / scale-down stabilization windows:
  the min / max of the recent recommendations);
- predictive: the Holt-Winters forecast (:func:`~modelkiln.deploy.autoscale.rolling_forecasts`)
  peak over the steps a decision covers (until a replica asked now could serve), plus
  ``z`` times the forecast's own error, sized by
  :class:`~modelkiln.deploy.autoscale.QueueModel`, optionally never below what the
  rate seen now needs, and scaling down only once the lower count has held for
  ``down_steps`` decisions;
- burst-blind bound: knows everything but when bursts start (:func:`burst_blind_oracle`);
- oracle: knows each step's rate and has no startup delay, sized per step at 99 %.

Scores: the share of requests answered within the p95 target (M/M/c per step) and the
replica-seconds used. Tuning and held-out evaluation: :mod:`.autoscale_tune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from modelkiln.deploy.autoscale import QueueModel, rolling_forecasts


@dataclass(frozen=True)
class TraceParts:
    """A synthetic trace by component: what a burst-blind bound may know, and what it may not."""

    calm: list[float]  # diurnal pattern + afternoon bump (req/s per step)
    noise: list[float]
    bursts: list[tuple[int, int, float]]  # (first step, steps, height req/s)

    def burst_rate(self, step: int, started_by: int | None = None) -> float:
        """Burst req/s at ``step``; with ``started_by``, only bursts started at or before it."""
        last = step if started_by is None else started_by
        return sum(h for s, n, h in self.bursts if s <= min(step, last) and step < s + n)

    def in_burst(self, step: int) -> bool:
        """Whether a burst covers ``step``."""
        return any(s <= step < s + n for s, n, _h in self.bursts)

    def burst_age(self, step: int) -> int:
        """Steps since the youngest burst covering ``step`` started (-1: none covers it)."""
        ages = [step - s for s, n, _h in self.bursts if s <= step < s + n]
        return min(ages) if ages else -1

    @property
    def trace(self) -> list[float]:
        """Requests/s per step: calm + bursts + noise, never negative."""
        import numpy as np

        bursts = np.zeros(len(self.calm))
        for start, length, height in self.bursts:
            bursts[start : start + length] += height
        total = np.asarray(self.calm) + bursts + np.asarray(self.noise)
        return [float(x) for x in np.clip(total, 0.0, None)]


def synthetic_parts(
    days: int, step_s: int, seed: int = 0, peak: float = 40.0, burst_scale: float = 1.0
) -> TraceParts:
    """The components of :func:`synthetic_trace` (same seed, same trace)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    steps = days * 86_400 // step_s
    hours = np.arange(steps) * step_s / 3600.0
    base = 0.55 + 0.45 * np.sin(2 * np.pi * (hours - 9.0) / 24.0)  # low at 03:00, high 15:00
    bump = 0.25 * np.exp(-(((hours % 24) - 14.0) ** 2) / 2.0)
    rate = peak * (base + bump) / 1.25
    bursts: list[tuple[int, int, float]] = []
    for start in rng.choice(steps, size=max(1, days * 3), replace=False):
        length = int(rng.integers(2, 6))  # drawn before the height (the traces of earlier runs)
        height = burst_scale * peak * rng.uniform(0.15, 0.35)
        if height > 0:  # (drawn all the same: burst_scale 0 keeps the noise of the traces)
            bursts.append((int(start), min(length, steps - int(start)), float(height)))
    noise = rng.normal(0.0, 0.04 * peak, steps)
    return TraceParts([float(x) for x in rate], [float(x) for x in noise], bursts)


def synthetic_trace(
    days: int, step_s: int, seed: int = 0, peak: float = 40.0, burst_scale: float = 1.0
) -> list[float]:
    """Requests/s per step: diurnal pattern + afternoon bump + bursts + noise (seeded);
    ``burst_scale`` multiplies the bursts' height (0: none, for the what-if row)."""
    return synthetic_parts(days, step_s, seed, peak, burst_scale).trace


@dataclass(frozen=True)
class BacktestResult:
    """Outcome of one policy over the replayed part of the trace."""

    policy: str
    within_target: float  # share of requests within the p95 target
    replica_seconds: float
    max_replicas: int


#: ``(history up to and including now, replicas serving now) -> replicas wanted``.
Policy = Callable[[list[float], int], int]


@lru_cache(maxsize=200_000)
def _within(model: QueueModel, rate: float, replicas: int) -> float:
    # Cached: a tuning grid scores the same (rate, replicas) pairs many times.
    return model.within_target(rate, replicas)


@lru_cache(maxsize=200_000)
def _size(model: QueueModel, rate: float) -> int:
    return model.replicas(rate)


def reactive_policy(
    model: QueueModel,
    target_util: float = 0.7,
    stabilization_steps: int = 1,
    *,
    upscale_steps: int = 1,
    tolerance: float = 0.1,
) -> Policy:
    """HPA-like: utilization of the serving replicas -> desired replicas.

    Utilization is the offered load over the serving capacity (not capped at 100 % as a
    CPU metric is, which favours this baseline in overload). Scale-up takes the lowest
    recommendation of the last ``upscale_steps``, scale-down the highest of the last
    ``stabilization_steps`` (the HPA's ``behavior`` windows; its defaults are 0 s and
    300 s).
    """
    recent: list[int] = []

    def decide(history: list[float], current: int) -> int:
        busy = history[-1] * model.service_time_s / (max(current, 1) * model.slots_per_replica)
        ratio = busy / target_util
        raw = current if abs(ratio - 1.0) <= tolerance else math.ceil(max(current, 1) * ratio)
        raw = max(model.min_replicas, min(model.max_replicas, raw))
        recent.append(raw)
        del recent[: -max(stabilization_steps, upscale_steps)]
        if raw > current:
            return max(current, min(recent[-upscale_steps:]))
        return min(current, max(recent[-stabilization_steps:]))

    return decide


def predictive_policy(
    model: QueueModel,
    forecasts: Any,
    *,
    lead: int,
    sigma: float = 0.0,
    z: float = 0.0,
    floor: bool = False,
    down_steps: int = 1,
) -> Policy:
    """Forecast peak over the next ``lead`` steps + ``z`` x ``sigma``, sized by ``model``.

    ``forecasts`` comes from :func:`rolling_forecasts` for the same trace (row ``t`` only
    uses the trace up to ``t``). ``lead`` should be ``startup_steps + 1``: a replica asked
    for now serves that many steps later, and one removed now cannot be back sooner.
    ``floor``: never below what the rate seen now needs. ``down_steps``: scale down only to
    the highest of the last ``down_steps`` recommendations (1: at once), the HPA's
    scale-down window: a replica dropped and asked for again a step later is charged for
    its start-up without serving.
    """
    recent: list[int] = []

    def decide(history: list[float], current: int) -> int:
        t = len(history) - 1
        peak = float(max(forecasts[t][:lead])) + z * sigma
        want = _size(model, round(max(peak, 0.0), 3))
        if floor:
            want = max(want, _size(model, round(history[-1], 3)))
        recent.append(want)
        del recent[:-down_steps]
        return max(recent)

    return decide


def forecast_sigma(trace: list[float], forecasts: Any, start: int, end: int, lead: int) -> float:
    """RMS error of the ``lead``-step forecast over ``trace[start:end]`` (the tuning part)."""
    errors = [trace[t + lead] - forecasts[t][lead - 1] for t in range(start, end - lead)]
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0


#: One replayed step: (replicas charged, replicas serving, requests, requests late).
Step = tuple[int, int, float, float]


def backtest(
    trace: list[float], train_steps: int, step_s: int, model: QueueModel, policy: Policy,
    name: str, startup_steps: int = 1, log: list[Step] | None = None,
) -> BacktestResult:  # fmt: skip
    """Replay ``trace[train_steps:]`` under ``policy``; score it. ``log`` receives one
    :data:`Step` per replayed step (for :func:`attribute`)."""
    ready: list[int] = [train_steps] * _size(model, round(trace[train_steps - 1], 3))
    total = ok = replica_s = 0.0
    peak = len(ready)
    for t in range(train_steps, len(trace)):
        serving = sum(1 for r in ready if r <= t)
        rate = trace[t]
        within = _within(model, rate, serving)
        total += rate * step_s
        ok += rate * step_s * within
        replica_s += len(ready) * step_s  # starting replicas cost too
        if log is not None:
            log.append((len(ready), serving, rate * step_s, rate * step_s * (1 - within)))
        peak = max(peak, len(ready))
        desired = policy(trace[: t + 1], serving)
        if desired > len(ready):
            ready += [t + 1 + startup_steps] * (desired - len(ready))
        elif desired < len(ready):
            ready = sorted(ready)[:desired]  # cancel the latest-ready (starting) ones first
    return BacktestResult(name, ok / total if total else 1.0, replica_s, peak)


def oracle(
    trace: list[float], train_steps: int, step_s: int, model: QueueModel,
    log: list[Step] | None = None,
) -> BacktestResult:  # fmt: skip
    """Knows every step's rate and starts replicas instantly, sized per step at ``model``'s
    share (not a strict lower bound: the score is over all requests, so a policy could be
    late on a few cheap steps; at 99 % per step it lands at ~99.9 %)."""
    total = ok = replica_s = 0.0
    peak = 0
    for rate in trace[train_steps:]:
        n = _size(model, round(rate, 3))
        within = _within(model, rate, n)
        total += rate * step_s
        ok += rate * step_s * within
        replica_s += n * step_s
        peak = max(peak, n)
        if log is not None:
            log.append((n, n, rate * step_s, rate * step_s * (1 - within)))
    return BacktestResult("oracle", ok / total if total else 1.0, replica_s, peak)


def burst_blind_oracle(
    parts: TraceParts, train_steps: int, step_s: int, model: QueueModel, *, lead: int,
    headroom: float = 0.0, knows_noise: bool = True, score_model: QueueModel | None = None,
) -> BacktestResult:  # fmt: skip
    """What bursts alone cost: knows the calm pattern (and, with ``knows_noise``, the noise)
    of every step exactly and starts replicas instantly without charge, but sees a burst
    only ``lead`` steps after it starts (``startup_steps + 1``: when a replica asked for at
    its first step could serve). Sized by ``model`` (its share and buffer) for the known
    rate + ``headroom`` req/s; scored at ``score_model`` (default ``model``). Any policy
    that cannot foresee bursts knows less than this one."""
    score = score_model or model
    trace = parts.trace
    total = ok = replica_s = 0.0
    peak = 0
    for t in range(train_steps, len(trace)):
        known = parts.calm[t] + (parts.noise[t] if knows_noise else 0.0)
        known += parts.burst_rate(t, started_by=t - lead)
        n = _size(model, round(max(known, 0.0) + headroom, 3))
        rate = trace[t]
        total += rate * step_s
        ok += rate * step_s * _within(score, rate, n)
        replica_s += n * step_s
        peak = max(peak, n)
    return BacktestResult("burst-blind", ok / total if total else 1.0, replica_s, peak)


@dataclass
class Attribution:
    """Where a policy's replica-seconds above the oracle's go, and where its late requests
    come from, summed over replays (:func:`attribute`). Keys: the part of the replay."""

    steps: dict[str, int] = field(default_factory=dict)
    excess_s: dict[str, float] = field(default_factory=dict)  # replica-s above the oracle
    late: dict[str, float] = field(default_factory=dict)  # requests late
    requests: float = 0.0

    def add(self, key: str, excess_s: float, late: float) -> None:
        """Count one step under ``key``."""
        self.steps[key] = self.steps.get(key, 0) + 1
        self.excess_s[key] = self.excess_s.get(key, 0.0) + excess_s
        self.late[key] = self.late.get(key, 0.0) + late


#: Parts of the day :func:`attribute` splits the replay into (hours, start inclusive).
DAY_PARTS = ((0, 6), (6, 12), (12, 18), (18, 24))


def attribute(
    parts: TraceParts, train_steps: int, step_s: int, policy_log: list[Step],
    oracle_log: list[Step], *, lead: int, into: Attribution | None = None,
) -> Attribution:  # fmt: skip
    """Split a replay (``policy_log`` from :func:`backtest`, ``oracle_log`` from
    :func:`oracle` on the same trace) by part of the day and by calm / burst steps; a burst
    step is "unseen" in its first ``lead`` steps (no replica asked for after it started
    can serve yet), "seen" after. Every step lands in exactly one part of the day and in
    exactly one of calm / unseen / seen."""
    out = into if into is not None else Attribution()
    for i, (mine, theirs) in enumerate(zip(policy_log, oracle_log, strict=True)):
        t = train_steps + i
        excess, late = (mine[0] - theirs[0]) * step_s, mine[3]
        out.requests += mine[2]
        hour = (t * step_s / 3600.0) % 24
        start, end = next(p for p in DAY_PARTS if p[0] <= hour < p[1])
        out.add(f"{start:02d}-{end:02d} h", excess, late)
        age = parts.burst_age(t)
        out.add("calm" if age < 0 else "burst, unseen" if age < lead else "burst, seen",
                excess, late)  # fmt: skip
    return out


def compare(
    days: int = 5, train_days: int = 3, step_s: int = 300, seed: int = 0
) -> list[BacktestResult]:
    """Both policies at their untuned defaults on one seeded trace (5-minute steps, 3 days
    of history, 2 replayed, 5-minute replica start). :mod:`.autoscale_tune` tunes them."""
    trace = synthetic_trace(days, step_s, seed)
    model = QueueModel(service_time_s=1.0, slots_per_replica=8, p95_target_s=2.0,
                       min_replicas=1, max_replicas=20)  # fmt: skip
    season = 86_400 // step_s
    train = train_days * season
    forecasts = rolling_forecasts(trace, train, season, horizon=1800 // step_s)
    predict = predictive_policy(model, forecasts, lead=1800 // step_s, floor=True)
    return [
        backtest(trace, train, step_s, model, reactive_policy(model), "reactive"),
        backtest(trace, train, step_s, model, predict, "predictive"),
    ]
