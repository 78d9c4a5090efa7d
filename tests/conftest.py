"""Shared test setup: markers from the path, offline hubs, GPU tests skipped without CUDA."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Spinning OpenMP workers collapse throughput when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Hardware measurements are cached per test session, never in the user's ~/.cache.
os.environ["MODELKILN_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="kiln-test-cache-")
atexit.register(shutil.rmtree, _CACHE, True)

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by folder (integration, e2e) and skip `gpu` tests without CUDA."""
    cuda = None
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def fake_cpu_class(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Call with avx2 / avx512_bf16 / amx: probes and precision decisions act as that class."""
    from modelkiln import hardware

    def use(name: str) -> None:
        monkeypatch.setenv(hardware.CPU_CLASS_ENV, name)
        hardware.clear_caches()

    yield use
    monkeypatch.delenv(hardware.CPU_CLASS_ENV, raising=False)
    hardware.clear_caches()
