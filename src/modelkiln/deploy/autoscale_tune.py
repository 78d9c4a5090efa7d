"""Tune the reactive and the predictive autoscaler the same way, then score them on held-out seeds.

Each policy gets a grid of settings. On the tuning seed, the setting with the fewest
replica-seconds that keeps >= ``goal`` of requests within the p95 target wins (the most
on-target one if none does). Both winners then replay traces of other seeds they were
not tuned on; the oracle (perfect knowledge, instant replicas) shows how much any policy
could save at all.

Example:
    >>> study = run_study(tune_seeds=[100, 101, 102], eval_seeds=[1, 2, 3])
    >>> print(render_markdown(study))
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from modelkiln.deploy.autoscale import QueueModel, rolling_forecasts
from modelkiln.deploy.autoscale_backtest import (
    DAY_PARTS,
    Attribution,
    BacktestResult,
    Step,
    TraceParts,
    attribute,
    backtest,
    burst_blind_oracle,
    forecast_sigma,
    oracle,
    predictive_policy,
    reactive_policy,
    synthetic_parts,
)

#: Reactive (HPA-like) grid: utilization target, scale-down / scale-up windows (steps).
REACTIVE_GRID: dict[str, list[Any]] = {
    "target_util": [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9],
    "stabilization_steps": [1, 3, 6],
    "upscale_steps": [1, 2],
}
#: Predictive grid: forecast-error multiple, queue-model share and buffer, reactive floor,
#: scale-down window (steps).
PREDICTIVE_GRID: dict[str, list[Any]] = {
    "z": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0],
    "share": [0.95, 0.99],
    "buffer": [1.0, 1.05, 1.1, 1.15, 1.2],
    "floor": [False, True],
    "down_steps": [1, 2, 3],
}
#: Burst-blind bound grid: head-room (req/s) on the known rate, queue-model share and buffer.
BOUND_GRID: dict[str, list[Any]] = {
    "headroom": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
    "share": [0.95, 0.99],
    "buffer": [1.0, 1.05, 1.1, 1.15, 1.2, 1.3],
}


@dataclass(frozen=True)
class Scenario:
    """The replayed world: trace shape, replica model and startup delay."""

    days: int = 5
    train_days: int = 3
    step_s: int = 300
    startup_steps: int = 1
    burst_scale: float = 1.0  # 0: the what-if without bursts
    bound_knows_noise: bool = True  # the burst-blind bound knows each step's noise too
    model: QueueModel = field(
        default_factory=lambda: QueueModel(1.0, 8, 2.0, buffer=1.0, max_replicas=20)
    )

    @property
    def season(self) -> int:
        """Steps per day."""
        return 86_400 // self.step_s

    @property
    def train(self) -> int:
        """Steps of history before the replayed part."""
        return self.train_days * self.season


@dataclass
class _Seed:
    trace: list[float]
    forecasts: Any
    sigma: float
    parts: TraceParts | None = None


def _prepare(sc: Scenario, seed: int) -> _Seed:
    parts = synthetic_parts(sc.days, sc.step_s, seed, burst_scale=sc.burst_scale)
    trace = parts.trace
    lead = sc.startup_steps + 1
    fc = rolling_forecasts(trace, sc.train, sc.season, horizon=lead)
    # The forecast's own error, measured on the history only (the last day before replay).
    sigma = forecast_sigma(trace, fc, sc.train - sc.season, sc.train, lead)
    return _Seed(trace, fc, sigma, parts)


def _settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def run_reactive(
    sc: Scenario, data: _Seed, setting: dict[str, Any], log: list[Step] | None = None
) -> BacktestResult:
    """One reactive replay with ``setting`` (keys of :data:`REACTIVE_GRID`)."""
    policy = reactive_policy(sc.model, **setting)
    return backtest(data.trace, sc.train, sc.step_s, sc.model, policy, "reactive",
                    sc.startup_steps, log)  # fmt: skip


def run_predictive(
    sc: Scenario, data: _Seed, setting: dict[str, Any], log: list[Step] | None = None
) -> BacktestResult:
    """One predictive replay with ``setting`` (keys of :data:`PREDICTIVE_GRID`)."""
    model = replace(sc.model, share=setting["share"], buffer=setting["buffer"])
    policy = predictive_policy(model, data.forecasts, lead=sc.startup_steps + 1,
                               sigma=data.sigma, z=setting["z"], floor=setting["floor"],
                               down_steps=setting.get("down_steps", 1))  # fmt: skip
    return backtest(data.trace, sc.train, sc.step_s, sc.model, policy, "predictive",
                    sc.startup_steps, log)  # fmt: skip


def run_bound(sc: Scenario, data: _Seed, setting: dict[str, Any]) -> BacktestResult:
    """One burst-blind bound replay with ``setting`` (keys of :data:`BOUND_GRID`)."""
    if data.parts is None:
        raise ValueError("the burst-blind bound needs the trace's parts (use _prepare)")
    model = replace(sc.model, share=setting["share"], buffer=setting["buffer"])
    return burst_blind_oracle(data.parts, sc.train, sc.step_s, model,
                              lead=sc.startup_steps + 1, headroom=setting["headroom"],
                              knows_noise=sc.bound_knows_noise,
                              score_model=sc.model)  # fmt: skip


def tune(
    sc: Scenario, seeds: list[_Seed], runner: Any, grid: dict[str, list[Any]], goal: float
) -> dict[str, Any]:
    """Cheapest setting (total replica-seconds) meeting ``goal`` on every tuning seed, else
    the one whose worst seed is the most on-target."""
    scored = []
    for setting in _settings(grid):
        results = [runner(sc, data, setting) for data in seeds]
        worst = min(r.within_target for r in results)
        scored.append((setting, worst, sum(r.replica_seconds for r in results)))
    meeting = [s for s in scored if s[1] >= goal]
    if meeting:
        return min(meeting, key=lambda s: s[2])[0]
    return max(scored, key=lambda s: s[1])[0]


@dataclass
class Study:
    """Tuned settings and per-seed results of both policies and the oracle."""

    scenario: Scenario
    tune_seeds: list[int]
    goal: float
    reactive_setting: dict[str, Any]
    predictive_setting: dict[str, Any]
    rows: list[tuple[int, BacktestResult, BacktestResult, BacktestResult]]  # seed, r, p, oracle
    sigma: dict[int, float] = field(default_factory=dict)
    bound_setting: dict[str, Any] = field(default_factory=dict)
    bound: dict[int, BacktestResult] = field(default_factory=dict)  # seed -> burst-blind bound
    #: Held-out seeds summed: "predictive" / "reactive" -> where their cost and lateness go.
    attribution: dict[str, Attribution] = field(default_factory=dict)


def run_study(
    tune_seeds: list[int] | None = None, eval_seeds: list[int] | None = None,
    goal: float = 0.99, scenario: Scenario | None = None,
    grids: tuple[dict[str, list[Any]], dict[str, list[Any]]] = (REACTIVE_GRID, PREDICTIVE_GRID),
    bound_grid: dict[str, list[Any]] | None = BOUND_GRID,
) -> Study:  # fmt: skip
    """Tune both policies on ``tune_seeds``; replay both on ``eval_seeds`` (held out).
    ``grids``: (reactive, predictive) settings to try; ``bound_grid``: the burst-blind
    bound's (tuned the same way; ``None``: no bound)."""
    sc = scenario or Scenario()
    tune_seeds = tune_seeds if tune_seeds is not None else [100, 101, 102]
    tuning = {seed: _prepare(sc, seed) for seed in tune_seeds}
    r_set = tune(sc, list(tuning.values()), run_reactive, grids[0], goal)
    p_set = tune(sc, list(tuning.values()), run_predictive, grids[1], goal)
    best = replace(sc.model, share=0.99)
    study = Study(sc, tune_seeds, goal, r_set, p_set, [])
    if bound_grid is not None:
        study.bound_setting = tune(sc, list(tuning.values()), run_bound, bound_grid, goal)
    lead = sc.startup_steps + 1
    for seed in [*tune_seeds, *(eval_seeds if eval_seeds is not None else [1, 2, 3, 4, 5])]:
        data = tuning[seed] if seed in tuning else _prepare(sc, seed)
        study.sigma[seed] = data.sigma
        logs: dict[str, list[Step]] = {"reactive": [], "predictive": [], "oracle": []}
        study.rows.append((seed, run_reactive(sc, data, r_set, logs["reactive"]),
                           run_predictive(sc, data, p_set, logs["predictive"]),
                           oracle(data.trace, sc.train, sc.step_s, best,
                                  logs["oracle"])))  # fmt: skip
        if bound_grid is not None:
            study.bound[seed] = run_bound(sc, data, study.bound_setting)
        if seed not in tune_seeds and data.parts is not None:
            for name in ("predictive", "reactive"):
                into = study.attribution.get(name)
                study.attribution[name] = attribute(data.parts, sc.train, sc.step_s, logs[name],
                                                    logs["oracle"], lead=lead,
                                                    into=into)  # fmt: skip
    return study


def _pct(x: float) -> str:
    return f"{x:.2%}".replace("%", " %")


def render_markdown(study: Study) -> str:
    """The table for docs/BENCHMARKS.md: one row per seed, then the held-out mean."""
    lines = [
        f"Tuning seeds {study.tune_seeds} (goal {_pct(study.goal)}): reactive "
        f"{study.reactive_setting}; predictive {study.predictive_setting}.",
        "",
        "| seed | reactive within | predictive within | oracle within "
        "| reactive replica-s | predictive replica-s | oracle replica-s "
        "| predictive / reactive | oracle / reactive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    held: list[tuple[float, float]] = []
    for seed, r, p, o in study.rows:
        ratio, bound = p.replica_seconds / r.replica_seconds, o.replica_seconds / r.replica_seconds
        tag = f"{seed} (tuning)" if seed in study.tune_seeds else str(seed)
        lines.append(
            f"| {tag} | {_pct(r.within_target)} | {_pct(p.within_target)} | "
            f"{_pct(o.within_target)} | {r.replica_seconds:,.0f} | {p.replica_seconds:,.0f} | "
            f"{o.replica_seconds:,.0f} | {ratio:.3f} | {bound:.3f} |"
        )
        if seed not in study.tune_seeds:
            held.append((ratio, bound))
    if held:
        mean = sum(h[0] for h in held) / len(held)
        lines.append(f"\nHeld-out mean predictive / reactive replica-seconds: {mean:.3f}; "
                     f"oracle / reactive: {sum(h[1] for h in held) / len(held):.3f}.")  # fmt: skip
    if study.bound:
        lines += ["", _render_bound(study)]
    if study.attribution:
        lines += ["", _render_attribution(study)]
    return "\n".join(lines)


def _render_bound(study: Study) -> str:
    noise = "and noise " if study.scenario.bound_knows_noise else ""
    lines = [
        f"Burst-blind bound (knows the calm pattern {noise}exactly, instant uncharged replicas, "
        f"sees a burst {study.scenario.startup_steps + 1} steps after it starts; tuned on the "
        f"tuning seeds the same way: {study.bound_setting}):",
        "",
        "| seed | bound within | bound replica-s | bound / reactive |",
        "|---|---:|---:|---:|",
    ]
    held = []
    for seed, r, _p, _o in study.rows:
        b = study.bound[seed]
        ratio = b.replica_seconds / r.replica_seconds
        tag = f"{seed} (tuning)" if seed in study.tune_seeds else str(seed)
        lines.append(f"| {tag} | {_pct(b.within_target)} | {b.replica_seconds:,.0f} | "
                     f"{ratio:.3f} |")  # fmt: skip
        if seed not in study.tune_seeds:
            held.append((ratio, b.within_target))
    if held:
        lines.append(f"\nHeld-out mean bound / reactive: {sum(h[0] for h in held) / len(held):.3f}"
                     f"; held-out seeds at >= {_pct(study.goal)}: "
                     f"{sum(h[1] >= study.goal for h in held)} of {len(held)}.")  # fmt: skip
    return "\n".join(lines)


def _render_attribution(study: Study) -> str:
    p, r = study.attribution["predictive"], study.attribution["reactive"]
    total = sum(p.steps.get(k, 0) for k in ("calm", "burst, unseen", "burst, seen"))
    lines = [
        "Held-out seeds summed: replica-seconds above the oracle's and late requests "
        "(% of all requests), by part of the replay:",
        "",
        "| part | steps | predictive extra replica-s | reactive extra replica-s "
        "| predictive late | reactive late |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    keys = [f"{a:02d}-{b:02d} h" for a, b in DAY_PARTS] + ["calm", "burst, unseen", "burst, seen"]
    for key in (k for k in keys if k in p.steps):
        lines.append(
            f"| {key} | {100 * p.steps[key] / total:.1f} % | {p.excess_s[key]:,.0f} | "
            f"{r.excess_s[key]:,.0f} | {_pct(p.late[key] / p.requests)} | "
            f"{_pct(r.late[key] / r.requests)} |"
        )
    return "\n".join(lines)
