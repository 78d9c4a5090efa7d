"""Sampled log-prob scoring, the rolling confidence track and the /v1/monitor gate fields."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from modelkiln.contract.serving import ServeHooks
from modelkiln.errors import ConfigError
from modelkiln.monitor.online import DriftMonitor, MonitorConfig
from modelkiln.monitor.profile import FeatureData, Profile, load_profile, write_profile
from modelkiln.monitor.prometheus import DriftCollector
from modelkiln.monitor.rolling import ROLLING_FEATURE
from modelkiln.monitor.serving import MonitorExtension


def lm_profile(tmp: Path, n: int = 1000) -> Profile:
    """A causal-LM-like profile: a request feature and mean log-probs around log(0.5)."""
    rng = np.random.default_rng(0)
    feats = {
        "x": FeatureData("num", "request", rng.normal(0, 1, n)),
        "mean_logprob": FeatureData("num", "output", np.log(rng.uniform(0.4, 0.6, n))),
    }
    return load_profile(write_profile(tmp / "p", feats, model_name="m", model_hash="h"))


class Wants:
    wants_logprobs = True

    def __init__(self, rate: float | None = None) -> None:
        if rate is not None:
            self.logprob_sample_rate = rate

    def observe(self, record: Any) -> None:
        pass


def test_logprobs_are_scored_for_a_sampled_share_of_requests(tmp_path: Path) -> None:
    random.seed(0)
    assert not ServeHooks().sample_logprobs()  # nobody asks: never
    assert all(ServeHooks(observers=[Wants()]).sample_logprobs() for _ in range(100))
    hooks = ServeHooks(observers=[Wants(0.1), Wants(0.2)], logprob_slot_s=0)
    assert hooks.logprob_rate == 0.2  # the largest share wins; slot 0: drawn per request
    share = np.mean([hooks.sample_logprobs() for _ in range(5000)])
    assert 0.17 < share < 0.23
    mon = DriftMonitor({"m": lm_profile(tmp_path)}, MonitorConfig(logprob_sample_rate=0.05))
    assert mon.wants_logprobs and ServeHooks(observers=[mon]).logprob_rate == 0.05


def test_logprob_sampling_is_decided_per_time_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    random.seed(1)
    now = [0.0]
    monkeypatch.setattr("modelkiln.contract.serving.time.monotonic", lambda: now[0])
    hooks = ServeHooks(observers=[Wants(0.2)])  # default slot: 1 s
    slots = []
    for i in range(3000):
        now[0] = i * 0.5 + 0.1  # two requests per slot
        slots.append(hooks.sample_logprobs())
    pairs = np.array(slots).reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all()  # one decision per slot: scored rows batch up
    assert 0.15 < pairs[:, 0].mean() < 0.25  # and each slot with the share's probability


def test_logprob_rate_flag_and_its_error() -> None:
    ext, parser = MonitorExtension(), argparse.ArgumentParser()
    ext.add_arguments(parser)
    cfg: Any = argparse.Namespace(models=[])
    hooks = ext.hooks(parser.parse_args(["--monitor-logprob-rate", "0.5"]), cfg)
    assert hooks is not None and hooks.logprob_rate == 0.0  # no profile wants log-probs
    mon: Any = hooks.observers[0]
    assert mon.config.logprob_sample_rate == 0.5
    mon.close()
    with pytest.raises(ConfigError, match="logprob_sample_rate"):
        ext.hooks(parser.parse_args(["--monitor-logprob-rate", "2"]), cfg)


def test_numpy_scores_match_the_torch_path() -> None:
    import torch

    from modelkiln.serve.generation.sampling import _token_scores_torch, token_scores

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = -torch.inf
    tokens, rows = [3, 9, 0, 299], [0, 1, 3]
    fast = token_scores(logits, tokens, [True, True, False, True])
    ref = _token_scores_torch(logits, tokens, rows, [None] * 4)
    assert fast[2] is None and ref[2] is None
    for a, b in zip(fast, ref, strict=True):
        if a is not None and b is not None:
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scores_of_every_row_match_log_softmax(dtype: str) -> None:
    """Every row asking (a scored slot): the view path, masked tokens and half precision."""
    import torch

    from modelkiln.serve.generation.sampling import token_scores

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    logits[0, :10] = -torch.inf  # masked tokens add no entropy
    logits = logits.to(getattr(torch, dtype))
    tokens = [12, 0, 49]
    got = token_scores(logits, tokens, [True, True, True])
    logp = torch.log_softmax(logits.float(), -1)
    for row, (lp, h) in enumerate(got):  # type: ignore[misc]
        entropy = -(logp[row].exp() * logp[row]).nan_to_num().sum().item()
        assert lp == pytest.approx(logp[row, tokens[row]].item(), abs=1e-5)
        assert h == pytest.approx(entropy, abs=1e-5)
    assert token_scores(logits, tokens, [False] * 3) == [None] * 3


def feed(mon: DriftMonitor, n: int, prob: float, rng: np.random.Generator, rate: float) -> int:
    """``n`` requests; a share ``rate`` carries a log-prob (as the server samples them)."""
    alarms = 0
    for _ in range(n):
        feats: dict[str, float] = {"x": float(rng.normal(0, 1))}
        if rng.random() < rate:
            feats["mean_logprob"] = float(np.log(rng.uniform(prob - 0.1, prob + 0.1)))
        mon.observe_features("m", "1", feats)
        if mon.check():
            alarms += any(s.drifted for s in mon.states())
    return alarms


def test_rolling_confidence_drop_is_detected_and_exported(tmp_path: Path) -> None:
    cfg = MonitorConfig(window=100, check_every_requests=50, confidence_window=100)
    mon = DriftMonitor({"m": lm_profile(tmp_path)}, cfg)
    rng = np.random.default_rng(1)
    assert feed(mon, 1500, 0.5, rng, rate=0.5) == 0  # steady confidence: no alarm
    snap = mon.snapshot()["models"][0]
    assert snap["drift_checked"] and not snap["drift_detected"]
    rolling = next(f for f in snap["features"] if f["feature"] == ROLLING_FEATURE)
    assert rolling["test"] == "confidence_drop" and rolling["n_current"] == 100
    assert 0.4 < snap["window_fill"]["mean_logprob"] < 0.6  # sampled: about the rate
    assert snap["window_fill"]["x"] == 1.0 and snap["windows"][ROLLING_FEATURE] == 200
    feed(mon, 300, 0.4, rng, rate=0.5)  # -20 % confidence
    state = next(s for s in mon.states() if s.feature == ROLLING_FEATURE)
    assert state.drifted and state.statistic > state.threshold
    text = _metrics(mon)
    assert (
        'ml_drift_detected{feature="confidence_rolling",model="m",test="confidence_drop",'
        'version="1"} 1.0' in text
    )


def test_rolling_threshold_is_calibrated_not_the_bare_five_percent(tmp_path: Path) -> None:
    """Reference confidences spread 0.4-0.6: two windows of 20 differ by more than 5 % by
    chance, so the calibrated threshold is above 5 %; at 500 it is well below."""
    small = DriftMonitor({"m": lm_profile(tmp_path)}, MonitorConfig(confidence_window=20))
    feed(small, 10, 0.5, np.random.default_rng(2), rate=1.0)
    track = next(iter(small._tracks.values()))
    assert track.rolling is not None and track.rolling.threshold(0.01) > 0.05
    large = DriftMonitor({"m": lm_profile(tmp_path)}, MonitorConfig(confidence_window=500))
    feed(large, 10, 0.5, np.random.default_rng(2), rate=1.0)
    track = next(iter(large._tracks.values()))
    assert track.rolling is not None and track.rolling.threshold(0.01) < 0.05


def test_models_without_traffic_or_profile_are_not_checked(tmp_path: Path) -> None:
    mon = DriftMonitor({}, MonitorConfig(), profile_status={"gone": ("missing", "no profile")})
    (entry,) = mon.snapshot()["models"]
    assert entry["drift_detected"] is False and entry["drift_checked"] is False


def _metrics(mon: DriftMonitor) -> str:
    reg = CollectorRegistry()
    reg.register(DriftCollector(mon))
    return generate_latest(reg).decode()


def test_finish_reason_is_a_categorical_live_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    feats = {
        "x": FeatureData("num", "request", rng.normal(0, 1, 1000)),
        "finish_reason": FeatureData("cat", "output", rng.choice(["stop", "length"], 1000)),
    }
    prof = load_profile(write_profile(tmp_path / "c", feats, model_name="m", model_hash="h"))
    cfg = MonitorConfig(window=200, check_every_requests=100)
    mon = DriftMonitor({"m": prof}, cfg)
    for i in range(400):  # records as the server sends them: the finish reason per choice
        out = SimpleNamespace(tokens=4, finish_reason=str(rng.choice(["stop", "length"])))
        rec = SimpleNamespace(model="m", version="1", status=200, latency_s=0.01,
                              time=float(i), prompt_ids=([1, 2],), input_bytes=4,
                              outputs=(out,))  # fmt: skip
        mon.observe(rec)
        mon.check()
    state = next(s for s in mon.states() if s.feature == "finish_reason")
    assert state.test == "chisquare" and not state.drifted and state.n_current == 200
    for _ in range(200):  # every answer now hits the token limit, or ends in a new way
        reason = "length" if rng.random() < 0.8 else "content_filter"
        mon.observe_features("m", "1", {"x": float(rng.normal(0, 1)), "finish_reason": reason})
        mon.check()
    state = next(s for s in mon.states() if s.feature == "finish_reason")
    assert state.drifted and state.p_value is not None and state.p_value < state.threshold
    x = next(s for s in mon.states() if s.feature == "x")
    assert not x.drifted


def test_warm_up_pays_the_one_time_costs_before_traffic(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    feats = {"x": FeatureData("num", "request", rng.normal(0, 1, 2000))}  # > 1,000: a distance
    prof = load_profile(write_profile(tmp_path / "w", feats, model_name="m", model_hash="h"))
    mon = DriftMonitor({"m": prof}, MonitorConfig(window=100))
    assert mon._thresholds == {}
    mon.warm_up()
    threshold = mon._thresholds[("m", "x", "wasserstein")]
    for _ in range(100):
        mon.observe_features("m", "1", {"x": float(rng.normal(0, 1))})
    (state,) = mon.check(force=True)
    assert state.threshold == threshold  # the first check reuses it
    assert "scipy.stats" in sys.modules
