"""Sequential tests: quiet under A/A, fast under a real difference."""

from __future__ import annotations

import math
import random

from modelkiln.rollout.analysis import (
    AnalysisConfig,
    ArmWindow,
    SequentialTest,
    failing_tests,
    new_tests,
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
