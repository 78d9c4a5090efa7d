"""ONNX export of a CNN and ONNX Runtime static int8 (QDQ) with calibration images.

``quantize_static`` calibrates activation ranges (MinMax) on real training images, then
writes a QDQ graph with per-channel symmetric int8 weights and uint8 activations; ONNX
Runtime folds the Q/DQ pairs into ``QLinearConv`` / ``QGemm`` kernels. Without VNNI /
AMX-int8 the weights use 7 bits (``reduce_range``): ORT's AVX2 u8s8 kernel (VPMADDUBSW)
can saturate its 16-bit sums with full 8-bit weights. ``torch.ao.quantization`` is
deprecated and torch's int8 CPU kernels are slow here, hence ONNX Runtime.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelkiln.contract import MODEL_ONNX
from modelkiln.errors import ConfigError
from modelkiln.onnxexport import export_guard, quiet_root_logger

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

INPUT, OUTPUT = "images", "logits"


def export_cnn_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 17) -> Path:
    """Export ``model`` (eval, fp32) to ``path`` with a dynamic batch axis.

    Raises:
        StageError: the exporter fails (the message names the model class).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with export_guard(
        model,
        f"ONNX export of {type(model).__name__} failed",
        hint="keep the forward pass free of data-dependent Python control flow",
        cause=False,
    ):
        torch.onnx.export(
            model,
            (example[:2],),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def quantize_cnn_static(
    src: Path,
    dst: Path,
    calibration: Iterable[torch.Tensor],
    *,
    reduce_range: bool | None = None,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Static int8 QDQ ``quantize_static`` of the fp32 graph ``src`` into ``dst``.

    Args:
        src: the fp32 ONNX model (input ``images``).
        dst: where the int8 model goes.
        calibration: image batches (N, C, H, W) whose activation ranges are recorded.
        reduce_range: 7-bit weights; None = on when the CPU has no int8 dot products.
        per_channel: one weight scale per output channel.

    Returns:
        What was done (for reports): calibration images, reduce_range, per_channel.

    Raises:
        ConfigError: no calibration batches.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from modelkiln.optimize.quantize import cpu_has_int8_dot

    feeds = [{INPUT: b.detach().float().cpu().numpy()} for b in calibration]
    if not feeds:
        raise ConfigError(
            "static int8 needs calibration images, got 0 batches",
            hint="pass a few training batches (e.g. calibration_batches: 8)",
        )
    reduce = (not cpu_has_int8_dot()) if reduce_range is None else reduce_range

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    # The calibrator writes an augmented model next to its input: work on a copy in tmp.
    with tempfile.TemporaryDirectory(prefix="kiln-cnn-calib-") as tmp, quiet_root_logger():
        local = Path(tmp) / MODEL_ONNX
        shutil.copyfile(src, local)
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(
            str(local),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    return {
        "calibration_images": sum(len(f[INPUT]) for f in feeds),
        "reduce_range": reduce,
        "per_channel": per_channel,
    }


def ort_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    """A CPU ONNX Runtime session with all graph optimizations and ``threads`` intra-op threads."""
    from modelkiln.onnxrt import cpu_session

    return cpu_session(path, threads)


def ort_logits(session: ort.InferenceSession, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of an exported CNN on ``x``, in batches."""
    import numpy as np

    arr = x.detach().float().cpu().numpy()
    outs = [
        session.run([OUTPUT], {INPUT: arr[i : i + batch_size]})[0]
        for i in range(0, len(arr), batch_size)
    ]
    return np.concatenate(outs)
