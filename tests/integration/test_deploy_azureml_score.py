"""The Azure ML scoring script runs modelkiln's engine: init() / run(raw_data) on a tiny
model, with the request bodies Azure's inference server passes (the raw JSON text)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from serve_support import save_tiny_gpt2

from modelkiln.deploy.azureml import write_azureml
from modelkiln.deploy.config import load_deploy_config


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("score", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_script_answers_like_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Azure mounts a registered model's folder under $AZUREML_MODEL_DIR/<folder name>.
    model = save_tiny_gpt2(tmp_path / "registered" / "coder")
    write_azureml(load_deploy_config(model_path=model), tmp_path / "out")
    score = _load_script(tmp_path / "out" / "azureml" / "score" / "score.py")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "registered"))
    monkeypatch.setenv("MODELKILN_MODEL_SUBDIR", "")
    score.init()
    try:
        body = {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
        out = score.run(json.dumps(body))
        assert out["object"] == "text_completion", out
        assert out["model"] == "coder"
        assert out["usage"]["completion_tokens"] >= 1
        again = score.run(json.dumps(body).encode())  # Azure may pass bytes
        assert again["choices"][0]["text"] == out["choices"][0]["text"]  # temperature 0
        bad = score.run("{not json")
        assert bad["error"]["code"] == 400
        limit = score.run(json.dumps({"prompt": "x", "max_tokens": -1}))
        assert limit["status"] == 400 and "error" in limit
    finally:
        score.shutdown()
