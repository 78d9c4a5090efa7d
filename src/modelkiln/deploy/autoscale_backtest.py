"""Backtest of predictive vs reactive autoscaling on a replayed request-rate trace.

The trace is declared synthetic (no production traffic exists here): a daily sine
pattern, a smaller weekly-free afternoon bump, random bursts and Gaussian noise, all
from one seed. Both policies see only the past; a replica asked for at step t serves
from step t + ``startup_steps`` (image pull + model load), and is removed at once.

- reactive: the Kubernetes HPA rule on utilization (desired = ceil(current x
  utilization / target)), scale-down stabilized over ``stabilization_steps``;
- predictive: :func:`~modelkiln.deploy.autoscale.holt_winters_peak` over the horizon,
  sized by :class:`~modelkiln.deploy.autoscale.QueueModel`, with a reactive floor.

Scores: the share of requests answered within the p95 target (M/M/c per step) and the
replica-seconds used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from modelkiln.deploy.autoscale import QueueModel, holt_winters_peak


def synthetic_trace(days: int, step_s: int, seed: int = 0, peak: float = 40.0) -> list[float]:
    """Requests/s per step: diurnal pattern + afternoon bump + bursts + noise (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    steps = days * 86_400 // step_s
    hours = np.arange(steps) * step_s / 3600.0
    base = 0.55 + 0.45 * np.sin(2 * np.pi * (hours - 9.0) / 24.0)  # low at 03:00, high 15:00
    bump = 0.25 * np.exp(-(((hours % 24) - 14.0) ** 2) / 2.0)
    rate = peak * (base + bump) / 1.25
    bursts = np.zeros(steps)
    for start in rng.choice(steps, size=max(1, days * 3), replace=False):
        bursts[start : start + int(rng.integers(2, 6))] += peak * rng.uniform(0.15, 0.35)
    noise = rng.normal(0.0, 0.04 * peak, steps)
    return [float(x) for x in np.clip(rate + bursts + noise, 0.0, None)]


@dataclass(frozen=True)
class BacktestResult:
    """Outcome of one policy over the test part of the trace."""

    policy: str
    within_target: float  # share of requests within the p95 target
    replica_seconds: float
    max_replicas: int


Policy = Callable[[list[float], int], int]


def reactive_policy(
    model: QueueModel, target_util: float = 0.7, stabilization_steps: int = 5
) -> Policy:
    """HPA-like: utilization of the replicas now -> desired, slow scale-down."""
    recent: list[int] = []

    def decide(history: list[float], current: int) -> int:
        busy = history[-1] * model.service_time_s / (current * model.slots_per_replica)
        desired = math.ceil(current * busy / target_util) if busy > 0 else model.min_replicas
        desired = max(model.min_replicas, min(model.max_replicas, desired))
        recent.append(desired)
        del recent[:-stabilization_steps]
        return desired if desired > current else max(recent)

    return decide


def predictive_policy(model: QueueModel, season: int, horizon: int, refit_every: int = 6) -> Policy:
    """Holt-Winters peak over the horizon (refitted every ``refit_every`` steps), sized by
    the queueing model; never below what the rate seen now needs."""
    cache: dict[str, float] = {}
    params: dict[str, float] = {}  # smoothing parameters, fitted on the first call

    def decide(history: list[float], current: int) -> int:
        if "peak" not in cache or len(history) % refit_every == 0:
            cache["peak"] = holt_winters_peak(history, season, horizon + refit_every, params)
        return max(model.replicas(cache["peak"]), model.replicas(history[-1]))

    return decide


def backtest(
    trace: list[float], train_steps: int, step_s: int, model: QueueModel, policy: Policy,
    name: str, startup_steps: int = 1,
) -> BacktestResult:  # fmt: skip
    """Replay ``trace[train_steps:]`` under ``policy``; score it."""
    serving = model.replicas(trace[train_steps - 1])
    pending: list[tuple[int, int]] = []  # (ready at step, replicas)
    total = ok = replica_s = 0.0
    peak = serving
    for t in range(train_steps, len(trace)):
        for ready_at, target in [p for p in pending if p[0] <= t]:
            serving = max(serving, target)
            pending.remove((ready_at, target))
        rate = trace[t]
        total += rate * step_s
        ok += rate * step_s * model.within_target(rate, serving)
        replica_s += serving * step_s
        peak = max(peak, serving)
        desired = policy(trace[: t + 1], serving)
        if desired < serving:
            serving = desired  # removal is immediate (after its drain)
        elif desired > serving:
            pending.append((t + 1 + startup_steps, desired))
    return BacktestResult(name, ok / total if total else 1.0, replica_s, peak)


def compare(
    days: int = 5, train_days: int = 3, step_s: int = 300, seed: int = 0
) -> list[BacktestResult]:
    """Run both policies on the same seeded trace (defaults: 5-minute steps, 3 days of
    history, 2 days replayed, 30-minute horizon, 5-minute replica start)."""
    trace = synthetic_trace(days, step_s, seed)
    model = QueueModel(service_time_s=1.0, slots_per_replica=8, p95_target_s=2.0,
                       min_replicas=1, max_replicas=20)  # fmt: skip
    season = 86_400 // step_s
    horizon = 1800 // step_s
    train = train_days * season
    return [
        # The HPA's default scale-down stabilization window is 300 s.
        backtest(
            trace,
            train,
            step_s,
            model,
            reactive_policy(model, stabilization_steps=max(1, 300 // step_s)),
            "reactive",
        ),
        backtest(
            trace, train, step_s, model, predictive_policy(model, season, horizon), "predictive"
        ),
    ]
