"""The online monitor: windows, calibrated checks, exported state (no server needed)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from modelkiln.errors import ConfigError
from modelkiln.monitor.online import DriftMonitor, MonitorConfig
from modelkiln.monitor.profile import FeatureData, Profile, load_profile, write_profile
from modelkiln.monitor.prometheus import DriftCollector


def profile(tmp: Path, n: int = 2000, seed: int = 0) -> Profile:
    rng = np.random.default_rng(seed)
    feats = {
        "x": FeatureData("num", "request", rng.normal(0, 1, n)),
        "y": FeatureData("num", "output", rng.normal(5, 2, n), test="psi"),
    }
    return load_profile(write_profile(tmp / "p", feats, model_name="m", model_hash="h"))


def stream(mon: DriftMonitor, n: int, shift: float, rng: np.random.Generator) -> int:
    """Feed ``n`` requests, checking as the background thread would; count drifted checks."""
    alarms = 0
    for _ in range(n):
        mon.observe_features("m", "1", {"x": rng.normal(shift, 1), "y": rng.normal(5, 2)})
        if mon.check():
            alarms += any(s.drifted for s in mon.states())
    return alarms


def test_no_drift_stream_of_10000_requests_has_at_most_one_false_alarm(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=500, check_every_requests=250)
    mon = DriftMonitor({"m": profile(tmp_path)}, cfg)
    assert stream(mon, 10_000, 0.0, np.random.default_rng(1)) <= 1
    assert mon.checks >= 10_000 // 250 - 1


def test_half_sigma_shift_is_detected_within_one_window(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=500, check_every_requests=250)
    mon = DriftMonitor({"m": profile(tmp_path)}, cfg)
    rng = np.random.default_rng(2)
    stream(mon, 1000, 0.0, rng)
    assert not any(s.drifted for s in mon.states())
    detected_at = None
    for i in range(1, 501):
        mon.observe_features("m", "1", {"x": rng.normal(0.5, 1), "y": rng.normal(5, 2)})
        if mon.check() and any(s.drifted for s in mon.states() if s.feature == "x"):
            detected_at = i
            break
    assert detected_at is not None  # within one window (500 requests) of the shift
    x = next(s for s in mon.states() if s.feature == "x")
    assert x.test == "wasserstein" and x.score > 1.0  # 2000 reference values: a distance


def test_thresholds_are_calibrated_below_the_bare_default(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=500, check_every_requests=250, tests={"x": "ks"})
    mon = DriftMonitor({"m": profile(tmp_path)}, cfg)
    stream(mon, 500, 0.0, np.random.default_rng(3))
    x = next(s for s in mon.states() if s.feature == "x")
    assert x.threshold_kind == "p_value" and x.threshold == pytest.approx(1e-4 * 250 / 2)


def test_windows_are_fixed_memory_and_only_full_windows_are_tested(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=100, check_every_requests=10)
    mon = DriftMonitor({"m": profile(tmp_path, n=300)}, cfg)
    rng = np.random.default_rng(4)
    stream(mon, 50, 0.0, rng)
    assert mon.states() == []
    stream(mon, 1000, 0.0, rng)
    snap = mon.snapshot()["models"][0]
    assert snap["windows"] == {"x": 100, "y": 100} and snap["requests"] == 1050


def test_observe_reads_request_records_and_prometheus_exports_gauges(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=20, check_every_requests=20)
    prof = profile(tmp_path, n=200)
    mon = DriftMonitor({"m": prof}, cfg, profile_status={"other": ("missing", "-")})
    for i in range(40):
        out = SimpleNamespace(tokens=3, mean_logprob=None, mean_entropy=None, embedding=None)
        rec = SimpleNamespace(model="m", version="1", status=500 if i == 0 else 200,
                              latency_s=0.01, time=1.0 + i, prompt_ids=([1, 2, 3],),
                              input_bytes=9, outputs=(out,))  # fmt: skip
        mon.observe(rec)
    mon.check(force=True)
    snap = mon.snapshot()
    m = next(x for x in snap["models"] if x["model"] == "m")
    assert m["requests"] == 40 and m["errors"] == 1 and m["latency_p50_s"] == pytest.approx(0.01)
    assert snap["models"][-1]["profile"]["status"] == "missing"
    reg = CollectorRegistry()
    reg.register(DriftCollector(mon))
    text = generate_latest(reg).decode()
    assert 'ml_monitor_profile{model="other",status="missing"} 1.0' in text
    assert "ml_drift_score" in text


def test_background_thread_checks_off_the_caller(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=20, check_every_requests=20, check_every_seconds=0.05)
    mon = DriftMonitor({"m": profile(tmp_path, n=200)}, cfg)
    seen: list[int] = []
    mon.add_listener(lambda states: seen.append(len(states)))
    mon.start()
    try:
        rng = np.random.default_rng(5)
        for _ in range(40):
            mon.observe_features("m", "1", {"x": rng.normal(3, 1), "y": rng.normal(5, 2)})
        for _ in range(400):  # bounded wait for the thread
            if seen:
                break
            time.sleep(0.05)
    finally:
        mon.stop()
    assert seen and any(s.drifted for s in mon.states())


def test_unknown_test_override_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown drift test 'kz'"):
        DriftMonitor({"m": profile(tmp_path)}, MonitorConfig(tests={"x": "kz"}))
