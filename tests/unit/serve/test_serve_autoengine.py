"""Fast by default: an encoder's HF directory is served by the fastest engine that passes the
parity gate here, built and timed once at first start and cached by the model's hash."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from http_helpers import tiny_encoder_dir

from modelkiln.serve import autoengine, enginebuild
from modelkiln.serve.config import ModelSpec, ServeConfig
from modelkiln.serve.encoders import OnnxEncoderBackend
from modelkiln.serve.loading import load_engine


def spec(**kw: Any) -> ModelSpec:
    return ModelSpec(path=tiny_encoder_dir(), name="enc", precision="fp32", **kw)


def test_first_start_builds_gates_times_and_logs_then_the_decision_is_reused(
    picking: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ServeConfig(models=[spec()])
    with caplog.at_level(logging.INFO, logger="modelkiln.serve"):
        first = autoengine.pick_encoder_engine(spec(), cfg)
    (decision_file,) = picking.glob("serve-engines/*/decision-*.json")
    data = json.loads(decision_file.read_text())
    rows = data["candidates"]
    assert set(rows) == {"torch-fp32", "onnx-fp32", "onnx-int8"}
    assert rows["onnx-fp32"]["min_cosine"] > 0.999  # the export matches torch
    passing = [n for n, r in rows.items() if r["min_cosine"] >= autoengine.MIN_COSINE]
    fastest = max(passing, key=lambda n: rows[n]["per_s"])
    assert data["engine"] in (fastest, "torch-fp32")  # torch keeps ties within MIN_GAIN
    assert (first.backend == "onnx") == data["engine"].startswith("onnx")
    logged = caplog.text
    assert "first start of enc" in logged and f"engine of enc: {data['engine']}" in logged

    def no_build(*_: Any) -> None:
        raise AssertionError("the second start must not export again")

    monkeypatch.setattr(enginebuild, "export_encoder", no_build)
    again = autoengine.pick_encoder_engine(spec(), cfg)
    assert again == first


def test_the_fastest_passing_onnx_engine_is_loaded(
    picking: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = {"torch-fp32": 10.0, "onnx-fp32": 50.0, "onnx-int8": 5.0}
    monkeypatch.setattr(autoengine, "_speeds", lambda backends, batch: fake)
    engine = load_engine(spec(), ServeConfig(models=[spec()]), lambda stats: None)
    assert isinstance(engine.backend, OnnxEncoderBackend)
    (decision_file,) = picking.glob("serve-engines/*/decision-*.json")
    assert json.loads(decision_file.read_text())["engine"] == "onnx-fp32"


def test_a_changed_model_gets_its_own_cache_entry(picking: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder_dir(), copy)
    before = autoengine.model_hash(copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    assert autoengine.model_hash(copy) != before


@pytest.mark.parametrize(
    ("kw", "env", "reason"),
    [
        ({"backend": "torch"}, None, "pinned"),
        ({}, "0", "is off"),
        ({}, None, "small model"),
    ],
)
def test_no_pick_when_pinned_switched_off_or_small(
    monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], env: str | None, reason: str
) -> None:
    if env is not None:
        monkeypatch.setenv(autoengine.PICK_ENV, env)
    else:
        monkeypatch.delenv(autoengine.PICK_ENV, raising=False)
    pick = autoengine.pick_encoder_engine(spec(**kw), ServeConfig(models=[spec(**kw)]))
    assert pick.backend == "torch" and reason in pick.reason
