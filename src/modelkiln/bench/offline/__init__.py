"""``kiln bench offline``: batch × sequence sweeps of a model on torch and ONNX Runtime."""

from modelkiln.bench.offline.sweep import OfflineConfig, optimal_batch, run_offline

__all__ = ["OfflineConfig", "optimal_batch", "run_offline"]
