"""Simulated rollouts under a fake clock: seeded traffic through the real policy, router
bookkeeping and controller (used by the unit tests and the A/A benchmark)."""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.rollout.controller import Controller
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.policy import TrafficPolicy, assign
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.spec import Decision, RolloutSpec
from modelkiln.rollout.state import StateStore


class SimClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        """The current (fake) time."""
        return self.time


@dataclass
class SimResult:
    """How a simulated rollout ended."""

    status: str
    seconds: float
    decisions: list[Decision] = field(default_factory=list)
    requests: int = 0

    @property
    def reason(self) -> str:
        """The last decision's reason."""
        return self.decisions[-1].reason if self.decisions else ""


@dataclass
class Traffic:
    """The simulated load: rate, latency distribution and the baseline's error rate."""

    rps: float = 10.0
    latencies_ms: list[float] | None = None
    """Recorded latencies to resample; None: lognormal around ``median_ms``."""
    median_ms: float = 50.0
    sigma: float = 0.4
    error_rate: float = 0.005


def _latency(rng: random.Random, t: Traffic) -> float:
    if t.latencies_ms:
        return rng.choice(t.latencies_ms)
    return t.median_ms * math.exp(rng.gauss(0.0, t.sigma))


def simulate(
    spec: RolloutSpec,
    traffic: Traffic,
    *,
    seed: int = 0,
    fault: FaultSpec | None = None,
    max_s: float = 6 * 3600.0,
    state_dir: Path | None = None,
) -> SimResult:
    """Run one rollout to its end (or ``max_s``) one simulated second at a time."""
    rng = random.Random(seed)
    injector = FaultInjector(fault or FaultSpec(), seed + 1)
    clock, rec = SimClock(), Recorder()
    policies: dict[str, TrafficPolicy] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(state_dir or Path(tmp))
        ctl = Controller(store, clock, rec, apply=lambda m, p: policies.__setitem__(m, p))
        ctl.start(spec)
        requests, carry = 0, 0.0
        while clock.time < max_s:
            clock.time += 1.0
            carry += traffic.rps
            while carry >= 1.0:
                carry -= 1.0
                requests += 1
                _one_request(spec, policies[spec.model], rec, rng, injector, traffic, clock.time)
            # tick() does nothing between test updates; skipping it saves a state read.
            due = clock.time % spec.canary.analysis_interval_s < 1.0
            if due and ctl.tick() and not _running(store, spec.model):
                break
        state = store.load(spec.model)
        decisions = store.decisions(spec.model)
        status = state.status if state else "missing"
        return SimResult(status, clock.time, decisions, requests)


def _running(store: StateStore, model: str) -> bool:
    state = store.load(model)
    return state is not None and state.status == "running"


def _one_request(
    spec: RolloutSpec,
    policy: TrafficPolicy,
    rec: Recorder,
    rng: random.Random,
    injector: FaultInjector,
    traffic: Traffic,
    now: float,
) -> None:
    a = assign(policy, rng=rng)
    served = _serve(spec, a.version, rec, rng, injector, traffic, now)
    if a.shadow is not None:
        mirrored = _serve(spec, a.shadow, rec, rng, injector, traffic, now)
        # Answers are compared for a shadow only (a canary's mirror: errors and latency).
        if served is not None and mirrored is not None and policy.shadow is not None:
            rec.record_pair(spec.model, 0.0 if served != mirrored else 1.0)


def _serve(
    spec: RolloutSpec,
    version: str,
    rec: Recorder,
    rng: random.Random,
    injector: FaultInjector,
    traffic: Traffic,
    now: float,
) -> str | None:
    """Record one simulated request; return its 'answer' (None when it failed)."""
    draw = injector.draw(now) if version == spec.candidate else None
    fail = rng.random() < traffic.error_rate or (draw is not None and draw.fail)
    ms = _latency(rng, traffic) + (draw.delay_ms if draw else 0.0)
    rec.record(spec.model, version, ok=not fail, latency_ms=ms)
    if fail:
        return None
    return "different" if draw is not None and draw.disagree else "same"
