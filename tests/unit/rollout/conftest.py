"""Fixtures of the rollout tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from rollout_helpers import make_model_dir

from modelkiln.rollout.registry import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """An empty registry in a temporary folder."""
    return Registry(tmp_path / "reg")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """One HF-like model folder."""
    return make_model_dir(tmp_path / "src-a", "a")
