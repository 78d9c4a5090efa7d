"""Sequential tests: quiet under A/A, fast under a real difference."""

from __future__ import annotations

import math
import random

from modelkiln.rollout.analysis import (
    AnalysisConfig,
    ArmWindow,
    SequentialTest,
    copies_due,
    failing_tests,
    new_tests,
    planned_copies,
    quantile,
    tail_counts,
    update_tests,
)


def _window(rng: random.Random, n: int, err: float, shift: float = 0.0) -> ArmWindow:
    lat = [50 * math.exp(rng.gauss(0, 0.4)) + shift for _ in range(n)]
    return ArmWindow(requests=n, errors=sum(rng.random() < err for _ in range(n)), latency_ms=lat)


def test_quantile_and_tails() -> None:
    assert quantile([1, 2, 3, 4], 0.5) == 2
    assert math.isnan(quantile([], 0.9))
    assert tail_counts([100.0] * 5, [1.0] * 95, 0.95) == (5, 0)


def test_error_test_has_no_evidence_without_errors() -> None:
    t = SequentialTest([2.0])
    t.update_two_arm(0, 50, 0, 950)
    assert t.log_evidence == 0.0
    t.update_two_arm(10, 50, 0, 950)
    assert t.log_evidence > 5


def test_aa_stays_under_the_bound_over_many_checks() -> None:
    cfg = AnalysisConfig()
    crossings = 0
    for seed in range(20):
        rng = random.Random(seed)
        tests = new_tests(cfg)
        for _ in range(60):
            cand, base = _window(rng, 30, 0.02), _window(rng, 270, 0.02)
            update_tests(tests, cfg, (0.05, 2000.0), (cand, base), [1.0] * 5)
        crossings += bool(failing_tests(tests, cfg))
    assert crossings == 0


def test_real_faults_cross_the_bound() -> None:
    cfg = AnalysisConfig()
    rng = random.Random(7)
    for kwargs, name in (({"err": 0.15}, "errors"), ({"err": 0.0, "shift": 200.0}, "latency")):
        tests = new_tests(cfg)
        for _ in range(5):
            cand = _window(rng, 150, **kwargs)  # type: ignore[arg-type]
            update_tests(tests, cfg, (0.05, 2000.0), (cand, _window(rng, 150, 0.0)), [])
        assert name in failing_tests(tests, cfg)


def test_absolute_slo_test() -> None:
    cfg = AnalysisConfig()
    tests = new_tests(cfg)
    rng = random.Random(3)
    for _ in range(5):
        w = _window(rng, 100, 0.0, shift=3000.0)
        update_tests(tests, cfg, (0.05, 2000.0), (w, _window(rng, 100, 0.0, 3000.0)), [])
    assert failing_tests(tests, cfg) == ["slo_latency"]


def test_copies_are_a_uniform_mixture_over_start_times() -> None:
    t = SequentialTest([2.0], copies=3)
    assert t.started == 1 and t.log_evidence == 0.0
    t.update_two_arm(0, 50, 5, 50)  # quiet: the baseline errs, evidence drifts down
    drifted = t.log_lr[0]
    assert drifted < 0
    t.start_copies(2)
    t.update_two_arm(5, 50, 0, 50)  # both live copies get the batch
    step = t.log_lr[1]
    assert step > 0 and t.log_lr[0] == drifted + step
    # the copy not started yet counts as 1 (log 0), each copy weighs 1/3
    want = math.log((math.exp(drifted + step) + math.exp(step) + 1.0) / 3)
    assert math.isclose(t.log_evidence, want)
    t.start_copies(10)
    assert t.started == 3  # never more than planned


def test_state_saved_before_restarts_loads_as_one_copy() -> None:
    t = SequentialTest([1.5, 2.0], [1.0, 3.0], copies=4)
    assert t.started == 1 and t.copies == 4
    over = SequentialTest([2.0], [1.0, 2.0, 3.0], copies=2)
    assert over.copies == 3  # a copy never weighs more than 1/n


def test_planned_and_due_copies() -> None:
    cfg = AnalysisConfig(restart_every_s=60)
    assert planned_copies(cfg, 600) == 10 and planned_copies(cfg, 30) == 1
    assert [copies_due(cfg, s) for s in (0, 59.9, 60, 300)] == [1, 1, 2, 6]
