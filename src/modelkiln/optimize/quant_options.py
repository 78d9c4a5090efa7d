"""Settings of the extra quantization methods: static int8, QAT, int4, TensorRT.

One sub-model, :class:`QuantExtraConfig`, is the ``quant`` field of
:class:`~modelkiln.optimize.config.OptimizeConfig`. Importing this module does
not import torch.

Example:
    >>> cfg = QuantExtraConfig(calibration={"method": "percentile"}, qat={"steps": 8})
    >>> cfg.calibration.method, cfg.qat.steps
    ('percentile', 8)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from modelkiln.configbase import KilnModel


class CalibrationConfig(KilnModel):
    """Static int8 (``onnx-int8-static``): how activation ranges are calibrated."""

    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax",
        description="ONNX Runtime calibration: 'minmax' (observed range), 'entropy' (KL-optimal "
        "clipping) or 'percentile' (clip at the given percentile of |x|).",
    )
    percentile: float = Field(
        99.999, gt=90, le=100, description="Percentile of |activation| kept ('percentile')."
    )
    max_batches: int = Field(
        16, ge=1, description="Calibration batches used at most (training batches, else samples)."
    )
    per_channel: bool = Field(True, description="One weight scale per output channel.")


class QatConfig(KilnModel):
    """Quantization-aware training (``qat-int8``): a short fine-tune with fake quantization."""

    steps: int = Field(
        50, ge=1, description="Optimizer steps over the training batches (cycled if fewer)."
    )
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate of the QAT fine-tune.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class Int4Config(KilnModel):
    """int4 weight-only (``onnx-int4-weight``): ONNX Runtime MatMulNBits blocks."""

    block_size: int = Field(
        32, ge=16, description="Weights per scale along the input dimension (power of two)."
    )
    symmetric: bool = Field(
        True, description="Symmetric int4 (no zero points); False: asymmetric with zero points."
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4,
        description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "(activations quantized to int8 per block: fastest on CPU).",
    )
    quantize_lm_head: bool = Field(
        False, description="Also quantize the output projection (lm_head) to int4."
    )


class QuantExtraConfig(KilnModel):
    """Settings of the static-int8, QAT, int4 and TensorRT variants."""

    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Static int8 calibration."
    )
    qat: QatConfig = Field(default_factory=QatConfig, description="Quantization-aware training.")
    int4: Int4Config = Field(default_factory=Int4Config, description="int4 weight-only.")
    kv_cache: bool = Field(
        True,
        description="Causal LMs: every ONNX Runtime variant (fp32, int8 dynamic / static, QAT, "
        "int4) also writes model_kv.onnx, a KV-cache graph quantized the same way, which "
        "the serving engine runs step by step in ONNX Runtime.",
    )
    tensorrt_fp16: bool = Field(
        True, description="TensorRT (GPU only): allow fp16 kernels (onnx-tensorrt)."
    )
