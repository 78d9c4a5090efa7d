"""The predictive autoscaler as a Ray Serve custom autoscaling policy (Ray >= 2.50).

Serve's controller calls the policy on every control-loop tick with an
``AutoscalingContext``. The policy turns the ongoing requests it reports into a request
rate (Little's law: rate = ongoing / mean service time), keeps one averaged sample per
``sample_s`` seconds in ``policy_state`` (the controller keeps it between ticks), forecasts
the peak over the horizon with Holt-Winters once two seasons are known, adds ``z`` times the
RMS error of its own past peak forecasts, and sizes replicas with the M/M/c model of
:mod:`modelkiln.deploy.autoscale` — with ``floor``, never below what the rate seen now needs.
Defaults keep the first version (×1.2 buffer, floor, z 0). The backtest's setting tuned on
ten seeds (docs/BENCHMARKS.md; the three-seed one did not hold on held-out seeds) is z 0.25,
share 0.99, buffer 1.2, floor, a horizon of the replica start-up time plus one sample, and a
scale-down window of three decisions: here Serve's ``downscale_delay_s`` (Serve applies its
up / down delays to a custom policy's decisions too), two samples long. Ray is not
imported here.

Example (what ``kiln deploy ray --predictive`` writes into ``autoscaling_config``):
    >>> {"policy": {"policy_function": "modelkiln.deploy.ray_policy:PredictivePolicy",
    ...             "policy_kwargs": {"service_time_s": 0.2, "p95_target_s": 1.0}}}
"""

from __future__ import annotations

import math
from typing import Any

from modelkiln.deploy.autoscale import QueueModel, holt_winters_peak

#: Import path Serve loads the policy from.
POLICY_PATH = "modelkiln.deploy.ray_policy:PredictivePolicy"


class PredictivePolicy:
    """Callable Serve policy: ``(ctx) -> (target replicas, policy_state)``."""

    def __init__(
        self,
        service_time_s: float = 0.2,
        slots_per_replica: int = 8,
        p95_target_s: float = 1.0,
        buffer: float = 1.2,
        sample_s: float = 60.0,
        season: int = 1440,
        horizon: int = 30,
        z: float = 0.0,
        share: float = 0.95,
        floor: bool = True,
    ) -> None:
        # Serve clamps to the deployment's bounds (below); the queue model must not clamp first.
        self.model = QueueModel(service_time_s, slots_per_replica, p95_target_s, buffer, 0, 10_000,
                                share)  # fmt: skip
        self.service_time_s = service_time_s
        self.sample_s, self.season, self.horizon = sample_s, season, horizon
        self.z, self.floor = z, floor
        self.params: dict[str, float] = {}  # Holt-Winters parameters, fitted once

    def _sample(self, state: dict[str, Any], now: float, rate: float) -> list[float]:
        """Fold ``rate`` into the current bucket; close it after ``sample_s``."""
        history: list[float] = state.setdefault("kiln_history", [])
        start = state.setdefault("kiln_bucket_start", now)
        state["kiln_bucket"] = [*state.get("kiln_bucket", []), rate]
        if now - start >= self.sample_s:
            bucket = state.pop("kiln_bucket")
            history.append(sum(bucket) / len(bucket))
            del history[: max(0, len(history) - 3 * self.season)]
            state["kiln_bucket_start"] = now
        return history

    def _sigma(self, state: dict[str, Any], history: list[float], peak: float) -> float:
        """RMS error of the past peak forecasts against the peaks that came (one a sample)."""
        pending: list[tuple[int, float]] = state.setdefault("kiln_pending", [])
        errors: list[float] = state.setdefault("kiln_errors", [])
        n = len(history)
        while pending and pending[0][0] <= n:
            due, predicted = pending.pop(0)
            errors.append(max(history[due - self.horizon : due]) - predicted)
        del errors[: max(0, len(errors) - self.season)]
        if state.get("kiln_samples") != n:  # one forecast recorded per closed sample
            pending.append((n + self.horizon, peak))
            state["kiln_samples"] = n
        return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else 0.0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Replicas for the forecast peak + z x its own error (and, with ``floor``, for at
        least the rate seen now)."""
        state = dict(ctx.policy_state or {})
        rate = max(0.0, float(ctx.total_num_requests)) / self.service_time_s
        now = float(ctx.current_time if ctx.current_time is not None else 0.0)
        history = self._sample(state, now, rate)
        peak = holt_winters_peak(history, self.season, self.horizon, self.params) if history else 0
        if self.z > 0 and history:
            peak += self.z * self._sigma(state, history, peak)
        target = max(rate, peak) if self.floor else peak
        want = self.model.replicas(target) if target > 0 else 0
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        state["kiln_forecast_rate"] = peak
        return max(low, min(high, want)), state
