"""Optimization stage: quantize / prune / distill / export variants, check parity, benchmark,
gate, choose, report.

Importing this package is light (no torch): names resolve on first use.

Example:
    >>> from modelkiln.optimize import OptimizeConfig, code_search_metric, optimize
    >>> result = optimize("runs/q/train/model", OptimizeConfig(), metric, "runs/q/optimize")
    >>> print(result.table)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OptimizeConfig": "modelkiln.optimize.config",
    "Tolerance": "modelkiln.optimize.config",
    "load_optimize_config": "modelkiln.optimize.config",
    "VARIANTS": "modelkiln.optimize.registry",
    "Variant": "modelkiln.optimize.registry",
    "optimize": "modelkiln.optimize.api",
    "OptimizeResult": "modelkiln.optimize.api",
    "ModelOptimizer": "modelkiln.optimize.api",
    "load_variant": "modelkiln.optimize.quantize",
    "QualityMetric": "modelkiln.optimize.gate",
    "EvalCard": "modelkiln.optimize.gate",
    "code_search_metric": "modelkiln.optimize.gate",
    "perplexity_metric": "modelkiln.optimize.gate",
    "export_onnx": "modelkiln.optimize.export",
    "validate_onnx": "modelkiln.optimize.export",
    "ParityReport": "modelkiln.optimize.export",
    "layer_error_report": "modelkiln.optimize.layer_error",
    "benchmark": "modelkiln.optimize.bench",
    "compare_models": "modelkiln.optimize.report",
    "optimize_source": "modelkiln.optimize.stage",
    "prepare_source": "modelkiln.optimize.sources",
    "export_kv_onnx": "modelkiln.optimize.kv_export",
    "OrtKvGenerator": "modelkiln.optimize.kv_export",
    "prune_model": "modelkiln.optimize.prune.gradual",
    "distill": "modelkiln.optimize.distill.core",
    "progressive_distill": "modelkiln.optimize.distill.core",
    "optimize_cnn": "modelkiln.optimize.vision.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkiln.optimize' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
