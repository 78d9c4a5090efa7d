"""Shared fixtures of the deploy tests: a model directory to deploy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory shaped like a promoted model (files are not read by the generators)."""
    path = tmp_path / "runs" / "quickstart" / "optimize" / "model"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    return path
