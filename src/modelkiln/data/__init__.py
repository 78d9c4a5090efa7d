"""Offline code data: the corpus, code-search pairs, HumanEval and the ``data`` stage.

Nothing heavy is imported here; names resolve lazily::

    from modelkiln.data import load_corpus, load_pairs, load_humaneval
    corpus = load_corpus("runs/quickstart/data")   # DatasetDict train/validation/test
    pairs = load_pairs(artifact)                    # an Artifact works too
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_corpus": "modelkiln.contract.corpus",
    "load_pairs": "modelkiln.contract.corpus",
    "load_humaneval": "modelkiln.contract.corpus",
    "run_data_stage": "modelkiln.data.stage",
    "SPLITS": "modelkiln.data.corpus",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modelkiln.data' has no attribute {name!r}")
