"""The monitor in the server: bad profiles warn once, set a metric and serving goes on;
/v1/monitor and /dashboard answer; --no-monitor turns it off."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from http_helpers import FakeEngine, client, config, metric, run

from modelkiln.monitor.profile import PROFILE_DIR, FeatureData, write_profile
from modelkiln.monitor.serving import MonitorExtension, monitor_hooks
from modelkiln.serve import create_app


def model_dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "weights.bin").write_bytes(name.encode())
    return d


def test_bad_profiles_warn_set_a_metric_and_serving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing, corrupt, other = (model_dir(tmp_path, n) for n in ("missing", "corrupt", "other"))
    feats = {"input_tokens": FeatureData("num", "request", np.arange(50.0))}
    write_profile(corrupt / PROFILE_DIR, feats, model_name="corrupt", model_hash="x")
    (corrupt / PROFILE_DIR / "profile.json").write_text('{"format": "modelk')
    write_profile(other / PROFILE_DIR, feats, model_name="other", model_hash="f" * 64)
    cfg = config(models=[{"path": str(p), "name": p.name} for p in (missing, corrupt, other)])
    with caplog.at_level(logging.WARNING, logger="modelkiln.monitor"):
        hooks = monitor_hooks(cfg)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert "kiln monitor profile" in warnings[0] and "corrupt or truncated" in warnings[1]
    assert "another model" in warnings[2]

    async def go() -> tuple[int, dict[str, object], str, str]:
        engines = {n: FakeEngine() for n in ("missing", "corrupt", "other")}
        app = create_app(cfg, engines=engines, hooks=hooks)
        async with client(app) as c:
            body = {"model": "other", "prompt": "def f(", "max_tokens": 2}
            status = (await c.post("/v1/completions", json=body)).status_code
            assert app.state.kiln.observers.flush(10)
            snap = (await c.get("/v1/monitor")).json()
            page = (await c.get("/dashboard")).text
            return status, snap, (await c.get("/metrics")).text, page

    status, snap, metrics, page = run(go())
    assert status == 200
    models: Any = snap["models"]
    by = {m["model"]: m["profile"]["status"] for m in models}
    assert by == {"missing": "missing", "corrupt": "corrupt", "other": "mismatched"}
    for name, st in by.items():
        assert metric(metrics, "ml_monitor_profile", model=name, status=st) == 1.0
    assert "/v1/monitor" in page and "<table" not in page.split("<script>")[0]


def test_no_monitor_flag_turns_it_off() -> None:
    ext = MonitorExtension()
    parser = argparse.ArgumentParser()
    ext.add_arguments(parser)
    assert ext.hooks(parser.parse_args(["--no-monitor"]), config()) is None
    hooks = ext.hooks(parser.parse_args(["--monitor-window", "50"]), config())
    assert hooks is not None
    mon: Any = hooks.observers[0]
    assert mon.config.window == 50
    mon.close()
