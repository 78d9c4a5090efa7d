"""Offline report from a feature log: JSON + HTML + PNG; the log never holds prompts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modelkiln.errors import ConfigError
from modelkiln.monitor.online import DriftMonitor, MonitorConfig
from modelkiln.monitor.profile import FeatureData, load_profile, write_profile
from modelkiln.monitor.report import read_feature_log, write_report


def test_feature_log_then_report(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = {
        "input_tokens": FeatureData("num", "request", rng.poisson(20, 400).astype(float)),
        "output_tokens": FeatureData("num", "output", rng.poisson(8, 400).astype(float)),
    }
    prof = load_profile(write_profile(tmp_path / "p", feats, model_name="m", model_hash="h"))
    log = tmp_path / "log" / "features.jsonl"
    mon = DriftMonitor({"m": prof}, MonitorConfig(feature_log=log))
    for i in range(200):  # drifted prompts (3 tokens, reference ~20), outputs as in the reference
        out = SimpleNamespace(tokens=int(rng.poisson(8)), mean_logprob=None, mean_entropy=None,
                              embedding=None)  # fmt: skip
        mon.observe(SimpleNamespace(model="m", version="1", status=200, latency_s=0.01,
                                    time=float(i), prompt_ids=([7, 8, 9],), input_bytes=12,
                                    outputs=(out,)))  # fmt: skip
    mon.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 200 and "prompt_ids" not in lines[0]
    assert lines[0]["features"]["input_tokens"] == 3.0
    cur = read_feature_log(log.parent, model="m")
    page = write_report(prof, cur, tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["drifted_features"] == ["input_tokens"]
    tests = {r["test"] for r in doc["results"] if r["feature"] == "input_tokens"}
    assert tests == {"ks", "psi", "t_test", "wasserstein", "jensenshannon", "mmd"}
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000
    assert "input_tokens" in page.read_text() and "data:image/png;base64" in page.read_text()


def test_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no feature log"):
        read_feature_log(tmp_path / "nope.jsonl")
