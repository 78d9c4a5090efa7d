"""The rollout controller under a fake clock: promote, roll back, hold, restart, commands."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from modelkiln.errors import ConfigError
from modelkiln.rollout.controller import Controller, DriftProbe
from modelkiln.rollout.policy import CanaryConfig, TrafficPolicy, assign
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.spec import RolloutSpec, RolloutState
from modelkiln.rollout.state import StateStore
from modelkiln.serve.clock import FakeClock

FAST = CanaryConfig(dwell_s=60, check_interval_s=10, min_requests=10)


class Harness:
    """A controller, its fake clock, and seeded traffic through the applied policy."""

    def __init__(self, tmp: Path, drift: DriftProbe | None = None) -> None:
        self.clock, self.rec, self.rng = FakeClock(), Recorder(), random.Random(0)
        self.policies: dict[str, TrafficPolicy] = {}
        self.finished: list[RolloutState] = []
        self.store = StateStore(tmp)
        self.ctl = self.controller(drift)

    def controller(self, drift: DriftProbe | None = None) -> Controller:
        return Controller(
            self.store, self.clock, self.rec,
            apply=self.policies.__setitem__, on_finish=self.finished.append,
            drift=drift,
        )  # fmt: skip

    def run(self, seconds: int, bad: str | None = None, slow: str | None = None) -> None:
        """Serve 20 requests a second; ``bad`` fails 30 % of its requests, ``slow`` +300 ms."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            for _ in range(20):
                a = assign(self.policies["m"], rng=self.rng)
                for v in filter(None, (a.version, a.shadow)):
                    fail = v == bad and self.rng.random() < 0.3
                    ms = 40 + 20 * self.rng.random() + (300 if v == slow else 0)
                    self.rec.record("m", v, ok=not fail, latency_ms=ms)
                    if a.shadow and v == a.shadow:
                        self.rec.record_pair("m", 1.0)
            self.ctl.tick()


def spec(**kw: object) -> RolloutSpec:
    return RolloutSpec.model_validate(
        {"model": "m", "baseline": "1", "candidate": "2", "canary": FAST, **kw}
    )


def test_canary_that_passes_ends_at_100_percent(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec())
    seen = []
    for _ in range(30):
        h.run(10)
        seen.append(dict(h.policies["m"].weights))
    assert {"1": 95, "2": 5} in seen and {"1": 50, "2": 50} in seen
    assert h.policies["m"].weights == {"2": 100}
    state = h.ctl.status("m")
    assert state is not None and state.status == "promoted"
    assert [s.status for s in h.finished] == ["promoted"]
    actions = [d.action for d in h.store.decisions("m")]
    assert actions[0] == "start" and actions.count("advance") == 2 and actions[-1] == "promote"


def test_faulty_candidate_rolls_back_and_logs_why(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec(candidate="3"))
    h.run(300, bad="3")
    state = h.ctl.status("m")
    assert state is not None and state.status == "rolled-back"
    assert h.policies["m"].weights == {"1": 100}
    last = h.store.decisions("m")[-1]
    assert last.action == "rollback" and "errors log-LR" in last.reason
    ev = last.numbers["log_evidence"]
    assert max(ev["errors"], ev["slo_errors"]) >= last.numbers["bound"]
    lines = h.store.log_path("m").read_text().splitlines()
    assert '"action":"rollback"' in lines[-1] and "errors log-LR" in lines[-1]


def test_slow_candidate_rolls_back_on_latency(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec())
    h.run(60, slow="2")
    last = h.store.decisions("m")[-1]
    assert last.action == "rollback" and "latency" in last.reason


def test_one_rollout_per_model(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec())
    before = h.store.log_path("m").read_text()
    with pytest.raises(ConfigError, match="already running"):
        h.ctl.start(spec(candidate="3"))
    assert h.store.log_path("m").read_text() == before
    with pytest.raises(ConfigError, match="is the baseline"):
        h.ctl.start(spec(model="n", candidate="1"))
    h.ctl.abort("m")
    assert h.policies["m"].weights == {"1": 100}
    with pytest.raises(ConfigError, match="no active rollout"):
        h.ctl.rollback("m")
    h.ctl.start(spec(candidate="3"))  # a finished rollout does not block the next


def test_restart_resumes_or_reverts(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec())
    h.run(70)
    assert h.policies["m"].weights == {"1": 75, "2": 25}
    h.policies.clear()
    h.ctl = h.controller()  # a new process on the same state folder
    h.ctl.resume()
    assert h.policies["m"].weights == {"1": 75, "2": 25}
    h.run(200)
    assert h.policies["m"].weights == {"2": 100}

    h2 = Harness(tmp_path / "b")
    h2.ctl.start(spec(on_restart="revert"))
    h2.run(70)
    h2.ctl = h2.controller()
    [state] = h2.ctl.resume()
    assert state.status == "rolled-back" and h2.policies["m"].weights == {"1": 100}


def test_operator_commands(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec())
    assert h.ctl.promote("m").status == "promoted"
    assert h.policies["m"].weights == {"2": 100}
    h.ctl.start(spec(baseline="2", candidate="3"))
    assert h.ctl.rollback("m", "bad smell").reason == "bad smell"
    assert h.policies["m"].weights == {"2": 100}


def test_blue_green_switches_and_switches_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec(strategy="blue-green", shadow_percent=50))
    assert h.policies["m"].weights == {"1": 100} and h.policies["m"].shadow == "2"
    h.run(70)
    assert h.policies["m"].weights == {"2": 100} and h.policies["m"].shadow == "1"
    h.run(70, bad="2")
    state = h.ctl.status("m")
    assert state is not None and state.status == "rolled-back"
    assert h.policies["m"].weights == {"1": 100} and h.policies["m"].shadow is None


def test_mirrored_latency_is_not_compared(tmp_path: Path) -> None:
    h = Harness(tmp_path)  # the mirrored arm is slower (it runs later, unstreamed): no rollback
    h.ctl.start(spec(strategy="shadow", shadow_percent=50))
    h.run(80, slow="2")
    state = h.ctl.status("m")
    assert state is not None and state.status == "awaiting-promotion"


def test_shadow_waits_for_manual_promotion(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec(strategy="shadow", shadow_percent=50))
    h.run(80)
    state = h.ctl.status("m")
    assert state is not None and state.status == "awaiting-promotion"
    assert h.policies["m"].weights == {"1": 100}
    h.ctl.promote("m")
    assert h.policies["m"].weights == {"2": 100}


def test_drift_holds_the_ramp(tmp_path: Path) -> None:
    h = Harness(tmp_path, drift=lambda _m, v: ["input_tokens (ks)"] if v == "2" else [])
    h.ctl.start(spec())
    h.run(200)
    assert h.policies["m"].weights == {"1": 95, "2": 5}
    last = h.store.decisions("m")[-1]
    assert last.action == "hold" and "drift on the candidate 2 (input_tokens (ks))" in last.reason
    assert last.numbers["drift"] == {"candidate": ["input_tokens (ks)"], "baseline": []}


def test_a_crossed_bound_rolls_back_before_the_next_check(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    slow_checks = CanaryConfig(dwell_s=600, check_interval_s=30, min_requests=10)
    h.ctl.start(spec(canary=slow_checks))
    h.run(40, bad="2")
    last = h.store.decisions("m")[-1]
    assert last.action == "rollback" and last.time < 30  # fake clock: before the first check
    assert h.policies["m"].weights == {"1": 100}


def test_tests_are_updated_every_analysis_interval(tmp_path: Path) -> None:
    class Counting(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.reads: list[float] = []

        def drain_pairs(self, model: str) -> list[float]:
            self.reads.append(clock.now())
            return super().drain_pairs(model)

    clock, rec = FakeClock(), Counting()
    ctl = Controller(StateStore(tmp_path), clock, rec)
    every_5 = CanaryConfig(dwell_s=600, check_interval_s=30, analysis_interval_s=5)
    ctl.start(spec(canary=every_5))
    for _ in range(32):
        clock.advance(1.0)
        ctl.tick()
    assert rec.reads[1:] == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]  # [0]: the start's drain


def test_test_copies_start_in_the_stage_and_survive_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.ctl.start(spec(analysis={"restart_every_s": 20}))  # dwell 60 s: 3 copies per stage
    h.run(45)  # copies started at 0, 20 and 40 s; saved at the check at 40 s
    state = h.ctl.status("m")
    assert state is not None and state.stage == 0
    n = len(state.spec.analysis.ratios)
    assert {len(v) for v in state.tests.values()} == {3 * n}
    saved = state.tests
    h.ctl = h.controller()  # a new process on the same state folder
    [resumed] = h.ctl.resume()
    assert resumed.tests == saved  # every copy keeps its evidence
    h.run(45)  # the resumed stage restarts its dwell; no more than 3 copies
    state = h.ctl.status("m")
    assert state is not None and state.stage == 0
    assert {len(v) for v in state.tests.values()} == {3 * n}
    h.run(20)  # the next stage starts with one copy again
    state = h.ctl.status("m")
    assert state is not None and state.stage == 1
    assert {len(v) for v in state.tests.values()} == {n}
