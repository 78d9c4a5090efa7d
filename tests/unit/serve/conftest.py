"""Fixtures shared by the serve unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.serve import autoengine


@pytest.fixture
def picking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A tiny test model counts as large enough to pick for; a cache of this test's own."""
    monkeypatch.setattr(autoengine, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setenv("MODELKILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(autoengine.PICK_ENV, raising=False)
    return tmp_path / "cache"
