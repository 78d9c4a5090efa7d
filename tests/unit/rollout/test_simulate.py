"""Simulated rollouts (seeded, fake clock): A/A promotes, injected faults roll back."""

from __future__ import annotations

from modelkiln.rollout.analysis import AnalysisConfig
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.policy import CanaryConfig
from modelkiln.rollout.simulate import Traffic, simulate
from modelkiln.rollout.spec import RolloutSpec

SPEC = RolloutSpec(
    model="m", baseline="1", candidate="2", canary=CanaryConfig(dwell_s=60, check_interval_s=10)
)


def test_aa_rollouts_promote() -> None:
    results = [simulate(SPEC, Traffic(rps=10), seed=s) for s in range(8)]
    assert [r.status for r in results] == ["promoted"] * 8


def test_injected_faults_roll_back() -> None:
    for fault, test in (
        (FaultSpec(error_rate=0.3, after_s=30), "errors"),
        (FaultSpec(extra_latency_ms=200, after_s=30), "latency"),
    ):
        r = simulate(SPEC, Traffic(rps=10), seed=3, fault=fault)
        assert r.status == "rolled-back" and test in r.reason
        assert r.seconds < 180


def test_different_answers_fail_shadow() -> None:
    spec = SPEC.model_copy(update={"strategy": "shadow", "shadow_percent": 50.0})
    r = simulate(spec, Traffic(rps=10), seed=1, fault=FaultSpec(disagree_rate=0.3))
    assert r.status == "rolled-back" and "agreement" in r.reason


def test_fault_injector_starts_late_and_is_seeded() -> None:
    inj = FaultInjector(FaultSpec(error_rate=1.0, extra_latency_ms=5, after_s=10), seed=0)
    assert not inj.draw(5).fail and inj.draw(5).delay_ms == 0
    assert inj.draw(11).fail and inj.draw(11).delay_ms == 5


def test_a_fault_that_starts_mid_stage_rolls_back_within_30_s() -> None:
    # The handbook canary (10 min per stage); 10 % errors from 5 min into the 5 % stage.
    fault = FaultSpec(error_rate=0.1, after_s=300)
    for seed in (0, 1):
        copies = RolloutSpec(model="m", baseline="1", candidate="2")
        r = simulate(copies, Traffic(rps=10), seed=seed, fault=fault, max_s=400)
        assert r.status == "rolled-back" and "errors" in r.reason
        assert r.seconds - fault.after_s <= 30
        # Without fresh copies the evidence drifted below zero for 5 min: slower (seeded).
        once = copies.model_copy(update={"analysis": AnalysisConfig(restart_every_s=600)})
        slow = simulate(once, Traffic(rps=10), seed=seed, fault=fault, max_s=400)
        assert slow.seconds - fault.after_s > 30
