"""Predictive autoscaling: forecast the request rate, size replicas with a queueing model.

The handbook's sketch (24 h history, 30 min horizon, 100 requests per replica, x1.2
buffer) becomes: Holt-Winters (``statsmodels`` ExponentialSmoothing, additive daily
season) on the server's own rate history; the forecast's peak over the horizon sized
with an M/M/c (Erlang C) model so the p95 latency stays under its target; the buffer on
top; and a reactive floor (the rate seen now), because bursts are not forecastable.

Example:
    >>> sizer = QueueModel(service_time_s=1.0, slots_per_replica=8, p95_target_s=2.0)
    >>> sizer.replicas(40.0)  # 40 req/s
    7
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from modelkiln.errors import ConfigError

#: Gauge a Prometheus adapter / KEDA reads to apply the recommendation.
RECOMMENDATION_METRIC = "modelkiln_recommended_replicas"


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (``load`` = lambda / mu, Erlangs).

    Hand-written (iterative Erlang B, then C) because scipy has no Erlang C and the
    recurrence is numerically stable for thousands of servers.
    """
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1 - b))


@dataclass(frozen=True)
class QueueModel:
    """Each replica serves ``slots_per_replica`` requests at once, each taking
    ``service_time_s`` on average (exponential); requests must finish within
    ``p95_target_s`` for 95 % of them."""

    service_time_s: float
    slots_per_replica: int
    p95_target_s: float
    buffer: float = 1.2
    min_replicas: int = 1
    max_replicas: int = 10
    share: float = 0.95  # of requests within the target the sizing aims for (p95: 0.95)

    def __post_init__(self) -> None:
        if self.p95_target_s <= self.service_time_s:
            raise ConfigError(
                f"p95_target_s ({self.p95_target_s}) must exceed service_time_s "
                f"({self.service_time_s})",
                hint="raise the latency target or lower the service time",
            )
        if not 0 < self.share < 1:
            raise ConfigError(
                f"share ({self.share}) must be between 0 and 1 (exclusive)",
                hint="use e.g. 0.95 for a p95 target, 0.99 for p99",
            )
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})",
                hint="set min_replicas <= max_replicas",
            )

    def within_target(self, rate: float, replicas: int) -> float:
        """Share of requests answered within the target at ``rate`` req/s (M/M/c tail;
        service time taken at its mean, so this is the waiting-time tail)."""
        if rate <= 0:
            return 1.0
        c = replicas * self.slots_per_replica
        mu = 1.0 / self.service_time_s
        if replicas < 1 or rate >= c * mu:
            return 0.0
        slack = self.p95_target_s - self.service_time_s
        late = erlang_c(c, rate / mu) * math.exp(-(c * mu - rate) * slack)
        return max(0.0, 1.0 - late)

    def needed(self, rate: float) -> int:
        """Fewest replicas keeping ``share`` of requests within the target (no buffer)."""
        n = 1
        while n < 10_000 and self.within_target(rate, n) < self.share:
            n += 1
        return n

    def replicas(self, rate: float) -> int:
        """Replicas for ``rate`` with the buffer, clamped to [min, max]."""
        n = math.ceil(self.needed(rate * self.buffer))
        return max(self.min_replicas, min(self.max_replicas, n))


def holt_winters_peak(
    history: list[float], season: int, horizon: int, params: dict[str, float] | None = None
) -> float:
    """Peak of the Holt-Winters forecast over the next ``horizon`` steps.

    Additive damped trend and additive season of ``season`` steps; needs two seasons of
    history, else the last season's maximum is returned. Pass a dict as ``params``: the
    first call fits the smoothing parameters and stores them there, later calls reuse
    them (one filter pass instead of an optimization: ~100x faster).
    """
    if len(history) < 2 * season:
        return max(history[-season:]) if history else 0.0
    import warnings

    import numpy as np
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    model = ExponentialSmoothing(
        np.asarray(history, dtype=float),
        trend="add",
        damped_trend=True,
        seasonal="add",
        seasonal_periods=season,
        initialization_method="estimated",
    )
    with warnings.catch_warnings():  # statsmodels warns on slow convergence; still usable
        warnings.simplefilter("ignore")
        if params:
            fitted = model.fit(**params, optimized=False)
        else:
            fitted = model.fit()
            if params is not None:
                keys = ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")
                params.update({k: float(fitted.params[k]) for k in keys})
    return float(max(0.0, float(np.max(fitted.forecast(horizon)))))


def rolling_forecasts(trace: list[float], train_steps: int, season: int, horizon: int) -> Any:
    """Holt-Winters forecasts made at every step: row ``t`` holds steps ``t+1..t+horizon``.

    The smoothing parameters and initial states are fitted once on ``trace[:train_steps]``
    (as :func:`holt_winters_peak` does on its first call); one filter pass over the whole
    trace then gives the states at each step, and row ``t`` uses only ``trace[:t+1]``. The
    h-step forecast is the standard damped additive one (checked against statsmodels'
    ``forecast`` in the tests); computing it from the states is ~500x faster than one
    statsmodels call per step, which a tuning grid over several seeds needs.
    """
    import warnings

    import numpy as np
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    data = np.asarray(trace, dtype=float)
    spec = {"trend": "add", "damped_trend": True, "seasonal": "add", "seasonal_periods": season}
    with warnings.catch_warnings():  # statsmodels warns on slow convergence; still usable
        warnings.simplefilter("ignore")
        fit = ExponentialSmoothing(
            data[:train_steps], initialization_method="estimated", **spec
        ).fit()
        p = fit.params
        full = ExponentialSmoothing(
            data, initialization_method="known", initial_level=p["initial_level"],
            initial_trend=p["initial_trend"], initial_seasonal=p["initial_seasons"], **spec,
        ).fit(
            smoothing_level=p["smoothing_level"], smoothing_trend=p["smoothing_trend"],
            smoothing_seasonal=p["smoothing_seasonal"], damping_trend=p["damping_trend"],
            optimized=False,
        )  # fmt: skip
    level, trend, seas = (np.asarray(x) for x in (full.level, full.trend, full.season))
    phi = float(p["damping_trend"])
    damp = np.cumsum(phi ** np.arange(1, horizon + 1))
    out = np.zeros((len(data), horizon))
    for t in range(season, len(data)):
        lead = t + np.arange(1, horizon + 1) - season * (1 + (np.arange(horizon) // season))
        out[t] = np.clip(level[t] + damp * trend[t] + seas[lead], 0.0, None)
    return out


def recommendation_gauge(registry: Any = None) -> Any:
    """A prometheus_client Gauge for the recommendation (HPA external metric / KEDA)."""
    from prometheus_client import Gauge

    kwargs = {"registry": registry} if registry is not None else {}
    return Gauge(RECOMMENDATION_METRIC, "Replicas the predictive autoscaler recommends", **kwargs)


def parse_range_query(body: dict[str, Any]) -> list[float]:
    """Values of the first series of a Prometheus ``/api/v1/query_range`` answer."""
    if body.get("status") != "success":
        raise ConfigError(
            f"Prometheus answered {body.get('status')!r}: {body.get('error', '')}",
            hint="check the query and the Prometheus URL",
        )
    result = body.get("data", {}).get("result", [])
    if not result:
        return []
    return [float(v) for _ts, v in result[0]["values"]]
