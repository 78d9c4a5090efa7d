"""Predictive autoscaler: Erlang C sizing, Holt-Winters forecast, seeded backtest."""

from __future__ import annotations

import math

import pytest

from modelkiln.deploy.autoscale import (
    QueueModel,
    erlang_c,
    holt_winters_peak,
    parse_range_query,
    recommendation_gauge,
)
from modelkiln.deploy.autoscale_backtest import (
    backtest,
    predictive_policy,
    reactive_policy,
    synthetic_trace,
)
from modelkiln.errors import ConfigError


def test_erlang_c_matches_the_textbook_value() -> None:
    # 2 servers, 1 Erlang: C = 1/3 (M/M/2 with rho = 0.5).
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: C = rho
    assert erlang_c(4, 4.0) == 1.0


def test_queue_model_sizes_monotonically_within_bounds() -> None:
    model = QueueModel(service_time_s=1.0, slots_per_replica=8, p95_target_s=2.0, max_replicas=50)
    sizes = [model.replicas(r) for r in (0, 5, 20, 40, 80, 160)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] > sizes[2]
    n = model.needed(40.0)
    assert model.within_target(40.0, n) >= 0.95 > model.within_target(40.0, n - 1)
    assert model.replicas(40.0) >= math.ceil(40.0 * 1.2 / 8)  # never past saturation
    assert QueueModel(1.0, 8, 2.0, max_replicas=3).replicas(1000.0) == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"p95_target_s": 0.5}, "p95_target_s"),
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas"),
    ],
)
def test_bad_queue_model_names_the_field(kwargs: dict, field: str) -> None:
    args = {"service_time_s": 1.0, "slots_per_replica": 8, "p95_target_s": 2.0} | kwargs
    with pytest.raises(ConfigError, match=field):
        QueueModel(**args)


def test_holt_winters_forecasts_the_coming_daily_peak() -> None:
    season = 48  # 30-minute steps
    day = [10 + 8 * math.sin(2 * math.pi * i / season) for i in range(season)]
    history = day * 3
    # The next 12 steps climb towards the daily peak (18 at step 12 of the season).
    peak = holt_winters_peak(history, season, horizon=13, params={})
    assert peak == pytest.approx(18.0, abs=1.0)
    assert holt_winters_peak(history[:40], season, 6) == max(history[:40])  # too short to fit


def test_backtest_is_seeded_and_predictive_beats_reactive_on_target() -> None:
    step_s, season = 1800, 48
    trace = synthetic_trace(days=3, step_s=step_s, seed=3)
    assert trace == synthetic_trace(days=3, step_s=step_s, seed=3)
    model = QueueModel(1.0, 8, 2.0, max_replicas=20)
    train = 2 * season
    reactive = backtest(trace, train, step_s, model, reactive_policy(model, 0.7, 1), "reactive")
    predictive = backtest(trace, train, step_s, model, predictive_policy(model, season, 1), "pred")
    for result in (reactive, predictive):
        assert 0.0 < result.within_target <= 1.0 and result.replica_seconds > 0
    assert predictive.within_target >= reactive.within_target


def test_prometheus_range_query_and_gauge() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    body = {"status": "success", "data": {"result": [{"values": [[1, "2.5"], [2, "3"]]}]}}
    assert parse_range_query(body) == [2.5, 3.0]
    with pytest.raises(ConfigError):
        parse_range_query({"status": "error", "error": "bad query"})
    registry = CollectorRegistry()
    recommendation_gauge(registry).set(4)
    assert b"modelkiln_recommended_replicas 4.0" in generate_latest(registry)
