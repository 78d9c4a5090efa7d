"""Predictive autoscaler: Erlang C sizing, Holt-Winters forecast, seeded backtest."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from modelkiln.deploy.autoscale import (
    QueueModel,
    erlang_c,
    holt_winters_peak,
    parse_range_query,
    recommendation_gauge,
    rolling_forecasts,
)
from modelkiln.deploy.autoscale_backtest import (
    Step,
    TraceParts,
    attribute,
    backtest,
    burst_blind_oracle,
    oracle,
    predictive_policy,
    reactive_policy,
    synthetic_parts,
    synthetic_trace,
)
from modelkiln.deploy.autoscale_tune import (
    Scenario,
    _prepare,
    _settings,
    render_markdown,
    run_bound,
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
    bound_grid = {"headroom": [0.0, 4.0], "share": [0.99], "buffer": [1.0, 1.3]}
    study = run_study([7], [8], goal=0.9, scenario=scenario, grids=grids, bound_grid=bound_grid)
    data = _prepare(scenario, 7)
    for runner, grid, chosen in ((run_reactive, grids[0], study.reactive_setting),
                                 (run_predictive, grids[1], study.predictive_setting),
                                 (run_bound, bound_grid, study.bound_setting)):  # fmt: skip
        scored = [(s, runner(scenario, data, s)) for s in _settings(grid)]
        meeting = [(s, r) for s, r in scored if r.within_target >= 0.9]
        best = (min(meeting, key=lambda sr: sr[1].replica_seconds) if meeting
                else max(scored, key=lambda sr: sr[1].within_target))  # fmt: skip
        assert chosen == best[0]
    assert [row[0] for row in study.rows] == [7, 8]
    assert all(row[3].within_target >= 0.99 for row in study.rows)  # the oracle sizes per step
    assert set(study.bound) == {7, 8}
    # Held-out seed 8 only: every replayed step is attributed once by hour and once by burst.
    att = study.attribution["predictive"]
    replayed = (scenario.days - scenario.train_days) * scenario.season
    assert (
        sum(att.steps[k] for k in ("calm", "burst, unseen", "burst, seen") if k in att.steps)
        == sum(v for k, v in att.steps.items() if k.endswith(" h"))
        == replayed
    )
    _seed, _r, p, o = study.rows[1]
    assert sum(v for k, v in att.excess_s.items() if k.endswith(" h")) == pytest.approx(
        p.replica_seconds - o.replica_seconds
    )
    text = render_markdown(study)
    assert "| 7 (tuning) |" in text and "| 8 |" in text and "Held-out mean" in text
    assert "Burst-blind bound" in text and "| burst, unseen |" in text
    quiet = run_study([7], [8], goal=0.9, scenario=replace(scenario, burst_scale=0.0),
                      grids=grids, bound_grid=bound_grid)  # fmt: skip
    assert "| calm | 100.0 % |" in render_markdown(quiet)  # no burst steps without bursts


def test_prometheus_range_query_and_gauge() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    body = {"status": "success", "data": {"result": [{"values": [[1, "2.5"], [2, "3"]]}]}}
    assert parse_range_query(body) == [2.5, 3.0]
    with pytest.raises(ConfigError):
        parse_range_query({"status": "error", "error": "bad query"})
    registry = CollectorRegistry()
    recommendation_gauge(registry).set(4)
    assert b"modelkiln_recommended_replicas 4.0" in generate_latest(registry)


def test_synthetic_parts_add_up_to_the_trace() -> None:
    parts = synthetic_parts(days=5, step_s=300, seed=3)
    trace = synthetic_trace(days=5, step_s=300, seed=3)
    assert parts.trace == trace and len(parts.bursts) == 15
    start, _length, height = parts.bursts[0]
    assert parts.in_burst(start) and parts.burst_age(start) == 0
    assert parts.burst_rate(start) >= height
    assert parts.burst_rate(start, started_by=start - 1) == pytest.approx(
        parts.burst_rate(start) - sum(h for s, _n, h in parts.bursts if s == start)
    )
    calm = [max(0.0, c + n) for c, n in zip(parts.calm, parts.noise, strict=True)]
    quiet = synthetic_parts(days=5, step_s=300, seed=3, burst_scale=0)
    assert quiet.trace == calm and quiet.bursts == [] and not quiet.in_burst(start)


def _flat_parts(steps: int, burst: tuple[int, int, float]) -> TraceParts:
    return TraceParts([4.0] * steps, [0.0] * steps, [burst])


def test_burst_blind_bound_sees_a_burst_only_lead_steps_after_it_starts() -> None:
    model = QueueModel(1.0, 8, 2.0, buffer=1.0, max_replicas=20, share=0.99)
    parts = _flat_parts(20, (12, 4, 40.0))  # 4 req/s, then 44 req/s for steps 12-15
    res = burst_blind_oracle(parts, 10, 60, model, lead=2)
    # Steps 12 and 13 run on the calm sizing (overloaded: all late); 14 and 15 are sized.
    calm_n, burst_n = model.replicas(4.0), model.replicas(44.0)
    assert model.within_target(44.0, calm_n) == 0.0  # overloaded
    ok = 6 * 4.0 * model.within_target(4.0, calm_n)  # steps 10-11 and 16-19
    ok += 2 * 44.0 * model.within_target(44.0, burst_n)
    assert res.within_target == pytest.approx(ok / (6 * 4.0 + 4 * 44.0))
    assert res.replica_seconds == 60 * (8 * calm_n + 2 * burst_n)
    roomy = burst_blind_oracle(parts, 10, 60, model, lead=2, headroom=40.0)
    assert roomy.within_target > 0.99 > res.within_target  # head-room absorbs the unseen steps


def test_predictive_scale_down_window_holds_the_highest_recent_count() -> None:
    model = QueueModel(1.0, 8, 2.0, buffer=1.0, max_replicas=20)
    forecasts = [[40.0], [4.0], [4.0], [4.0], [40.0]]
    high, low = model.replicas(40.0), model.replicas(4.0)
    at_once = predictive_policy(model, forecasts, lead=1)
    held = predictive_policy(model, forecasts, lead=1, down_steps=3)
    got_at_once = [at_once([0.0] * (t + 1), 0) for t in range(5)]
    got_held = [held([0.0] * (t + 1), 0) for t in range(5)]
    assert got_at_once == [high, low, low, low, high]
    assert got_held == [high, high, high, low, high]  # down after 3 low decisions, up at once


def test_attribution_splits_cost_and_lateness_by_day_part_and_burst() -> None:
    model = QueueModel(1.0, 8, 2.0, buffer=1.0, max_replicas=20, share=0.99)
    step_s, train = 3600, 24  # hourly steps: one replayed day
    parts = TraceParts([4.0] * 48, [0.0] * 48, [(36, 3, 40.0)])  # a burst at 12:00-15:00
    trace = parts.trace
    mine: list[Step] = []
    theirs: list[Step] = []

    def policy(history: list[float], serving: int) -> int:
        return model.replicas(history[-1]) + 1  # reactive, one spare replica

    res = backtest(trace, train, step_s, model, policy, "p", startup_steps=1, log=mine)
    best = oracle(trace, train, step_s, model, log=theirs)
    att = attribute(parts, train, step_s, mine, theirs, lead=2)
    assert att.steps == {"00-06 h": 6, "06-12 h": 6, "12-18 h": 6, "18-24 h": 6, "calm": 21,
                         "burst, unseen": 2, "burst, seen": 1}  # fmt: skip
    total = res.replica_seconds - best.replica_seconds
    assert sum(att.excess_s[k] for k in ("calm", "burst, unseen", "burst, seen")) == total
    # Nearly all the late requests are in the burst's first two hours (no replica could be
    # ready); the rest is the M/M/c tail of the calm steps.
    late = sum(att.late.values()) / 2  # each step counted twice: day part + burst state
    assert att.late["burst, unseen"] == pytest.approx(late, rel=1e-3) and late > 0
    assert att.late["12-18 h"] == pytest.approx(late, rel=1e-3)
    assert 1 - late / att.requests == pytest.approx(res.within_target)
