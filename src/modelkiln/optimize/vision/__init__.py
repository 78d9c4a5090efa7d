"""The plain-PyTorch CNN path: a digits CNN, conv-BN fusion, static int8, channel pruning,
distillation and a safe checkpoint format for plain ``torch.nn.Module`` models.

Why it is not in the variant registry: registry variants are built from a Hugging Face
model folder (a :class:`~modelkiln.contract.hfmodel.ModelInfo` read from ``config.json``,
tokenized text inputs, the transformer quality gates); a plain ``nn.Module`` has none of
that. This path shares the same contracts and core mechanisms instead: the ONNX graph
file name (:data:`modelkiln.contract.MODEL_ONNX`), the one export-error path
(:func:`modelkiln.onnxexport.export_guard`), the CPU ONNX Runtime session
(:func:`modelkiln.onnxrt.cpu_session`) and the optimize stage's timing helpers, and
:func:`modelkiln.optimize.sources.prepare_source` sends a ``module.json`` checkpoint here.

Modules (all but :mod:`~modelkiln.optimize.vision.config` import torch when used):

* :mod:`~modelkiln.optimize.vision.config`: :class:`CnnOptimizeConfig`;
* :mod:`~modelkiln.optimize.vision.model`: :class:`DigitsCNN`, the digits data split,
  training and accuracy;
* :mod:`~modelkiln.optimize.vision.checkpoint`: the ``module.json`` + ``model.safetensors``
  checkpoint of a plain module (:func:`save_module`, :func:`load_module`);
* :mod:`~modelkiln.optimize.vision.transforms`: conv-BN fusion, L1 / Taylor channel pruning
  and logit distillation;
* :mod:`~modelkiln.optimize.vision.onnx_int8`: ONNX export and ONNX Runtime static int8 (QDQ);
* :mod:`~modelkiln.optimize.vision.pipeline`: :func:`optimize_cnn` / :class:`DigitsCNNOptimizer`,
  every variant side by side (accuracy, size, latency) as a markdown table.

Importing this package does not import torch: names resolve on first use.

Example:
    >>> from modelkiln.optimize.vision import CnnOptimizeConfig, optimize_cnn
    >>> result = optimize_cnn(CnnOptimizeConfig(), "runs/cnn")  # doctest: +SKIP
    >>> print(result.table)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CnnOptimizeConfig": "modelkiln.optimize.vision.config",
    "DigitsCNN": "modelkiln.optimize.vision.model",
    "DigitsData": "modelkiln.optimize.vision.model",
    "load_digits_split": "modelkiln.optimize.vision.model",
    "train_classifier": "modelkiln.optimize.vision.model",
    "accuracy": "modelkiln.optimize.vision.model",
    "save_module": "modelkiln.optimize.vision.checkpoint",
    "load_module": "modelkiln.optimize.vision.checkpoint",
    "fuse_conv_bn": "modelkiln.optimize.vision.transforms",
    "prune_channels": "modelkiln.optimize.vision.transforms",
    "distill": "modelkiln.optimize.vision.transforms",
    "export_cnn_onnx": "modelkiln.optimize.vision.onnx_int8",
    "quantize_cnn_static": "modelkiln.optimize.vision.onnx_int8",
    "optimize_cnn": "modelkiln.optimize.vision.pipeline",
    "CnnResult": "modelkiln.optimize.vision.pipeline",
    "DigitsCNNOptimizer": "modelkiln.optimize.vision.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
