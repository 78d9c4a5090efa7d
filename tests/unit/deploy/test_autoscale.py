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
    rolling_forecasts,
)
from modelkiln.deploy.autoscale_backtest import backtest, reactive_policy, synthetic_trace
from modelkiln.deploy.autoscale_tune import (
    Scenario,
    _prepare,
    _settings,
    render_markdown,
    run_predictive,
    run_reactive,
    run_study,
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


def test_rolling_forecasts_equal_statsmodels_forecast_from_the_same_history() -> None:
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    season, step_s = 48, 1800
    trace = synthetic_trace(days=4, step_s=step_s, seed=5)
    train = 2 * season
    rows = rolling_forecasts(trace, train, season, horizon=3)
    fit = ExponentialSmoothing(
        trace[:train],
        trend="add",
        damped_trend=True,
        seasonal="add",
        seasonal_periods=season,
        initialization_method="estimated",
    ).fit()
    p = fit.params
    t = train + 20  # a forecast made after the fit, from the history up to t only
    again = ExponentialSmoothing(
        trace[: t + 1], trend="add", damped_trend=True, seasonal="add", seasonal_periods=season,
        initialization_method="known", initial_level=p["initial_level"],
        initial_trend=p["initial_trend"], initial_seasonal=p["initial_seasons"],
    ).fit(smoothing_level=p["smoothing_level"], smoothing_trend=p["smoothing_trend"],
          smoothing_seasonal=p["smoothing_seasonal"], damping_trend=p["damping_trend"],
          optimized=False)  # fmt: skip
    assert list(rows[t]) == pytest.approx([max(0.0, v) for v in again.forecast(3)])


def test_backtest_starts_replicas_after_the_delay_and_charges_them() -> None:
    model = QueueModel(1.0, 8, 2.0, buffer=1.0, max_replicas=20)
    trace = [4.0] * 10 + [60.0] * 10  # a step the policy cannot see coming
    asked: list[int] = []

    def policy(history: list[float], serving: int) -> int:
        asked.append(serving)
        return model.replicas(history[-1])

    result = backtest(trace, 10, 60, model, policy, "p", startup_steps=2)
    need = model.replicas(60.0)
    # Asked at step 10 (the first at 60 req/s), serving from step 13; the 3 steps between
    # are overloaded, and the starting replicas are paid for from step 11.
    assert asked[:4] == [1, 1, 1, need]
    assert result.within_target == pytest.approx(7 / 10, abs=0.01)
    assert result.replica_seconds == 60 * (1 + 9 * need)


def test_hpa_stabilization_holds_the_highest_recent_recommendation() -> None:
    model = QueueModel(1.0, 10, 2.0, buffer=1.0, max_replicas=20)
    decide = reactive_policy(model, target_util=0.5, stabilization_steps=3, tolerance=0.0)
    # 50 req/s on 5 replicas = 100 % busy -> 10 replicas at once (no up window).
    assert decide([50.0], 5) == 10
    # The load halves: the recommendation (5) waits out the 3-step window.
    assert [decide([25.0], 10), decide([25.0], 10), decide([25.0], 10)] == [10, 10, 5]


def test_study_tunes_each_policy_to_its_cheapest_setting_meeting_the_goal() -> None:
    scenario = Scenario(days=4, train_days=2, step_s=1800)
    grids = ({"target_util": [0.5, 0.7, 0.9], "stabilization_steps": [1], "upscale_steps": [1]},
             {"z": [0.0, 2.0], "share": [0.95], "buffer": [1.0, 1.2], "floor": [True]})  # fmt: skip
    study = run_study([7], [8], goal=0.9, scenario=scenario, grids=grids)
    data = _prepare(scenario, 7)
    for runner, grid, chosen in ((run_reactive, grids[0], study.reactive_setting),
                                 (run_predictive, grids[1], study.predictive_setting)):  # fmt: skip
        scored = [(s, runner(scenario, data, s)) for s in _settings(grid)]
        meeting = [(s, r) for s, r in scored if r.within_target >= 0.9]
        best = (min(meeting, key=lambda sr: sr[1].replica_seconds) if meeting
                else max(scored, key=lambda sr: sr[1].within_target))  # fmt: skip
        assert chosen == best[0]
    assert [row[0] for row in study.rows] == [7, 8]
    assert all(row[3].within_target >= 0.99 for row in study.rows)  # the oracle sizes per step
    text = render_markdown(study)
    assert "| 7 (tuning) |" in text and "| 8 |" in text and "Held-out mean" in text


def test_prometheus_range_query_and_gauge() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    body = {"status": "success", "data": {"result": [{"values": [[1, "2.5"], [2, "3"]]}]}}
    assert parse_range_query(body) == [2.5, 3.0]
    with pytest.raises(ConfigError):
        parse_range_query({"status": "error", "error": "bad query"})
    registry = CollectorRegistry()
    recommendation_gauge(registry).set(4)
    assert b"modelkiln_recommended_replicas 4.0" in generate_latest(registry)
