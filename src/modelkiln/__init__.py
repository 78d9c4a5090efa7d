"""modelkiln: fine-tune, compress, serve, benchmark and monitor transformer models.

The public API is re-exported here lazily (nothing heavy is imported until
used)::

    from modelkiln import load_config, run_pipeline, load_artifact
    result = run_pipeline(load_config("configs/quickstart.yaml"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "modelkiln.config",
    "PipelineConfig": "modelkiln.config",
    "run_pipeline": "modelkiln.pipeline",
    "PipelineResult": "modelkiln.pipeline",
    "load_artifact": "modelkiln.artifacts",
    "Artifact": "modelkiln.artifacts",
    "run_doctor": "modelkiln.doctor",
    "KilnError": "modelkiln.errors",
    "ConfigError": "modelkiln.errors",
    "ArtifactError": "modelkiln.errors",
    "DataError": "modelkiln.errors",
    "DependencyMissingError": "modelkiln.errors",
    "EnvironmentCheckError": "modelkiln.errors",
    "StageError": "modelkiln.errors",
    "QualityGateError": "modelkiln.errors",
    "ServingError": "modelkiln.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modelkiln' has no attribute {name!r}")
