"""Static int8 post-training quantization with calibration data (ONNX Runtime ``quantize_static``).

``onnx-int8-static``: the plain ONNX export, quantized to QDQ int8 with
activation ranges calibrated on real batches: the context's ``train_batches``
when there are any (never the held-out evaluation data), else its ``samples`` (MinMax,
Entropy or Percentile, :class:`~modelkiln.optimize.quant_options.CalibrationConfig`),
int8 per-channel symmetric weights and uint8 activations (the CPU
recommendation of ONNX Runtime). Only ``MatMul`` / ``Gemm`` are quantized, the
ops the dynamic variant quantizes: quantizing the attention-mask ``Add`` (huge
negative constants) or LayerNorm inputs with one fixed range costs accuracy for
no speed on CPU. Without VNNI / AMX-int8 the weights use 7 bits
(``reduce_range``, see :class:`~modelkiln.optimize.config.OnnxConfig`).

For causal LMs the directory also holds ``model_kv.onnx`` (the KV-cache graph
of :mod:`~modelkiln.optimize.kv_export`, quantized the same way, calibrated on
prefill *and* decode steps) when ``quant.kv_cache`` is on.

Importing this module does not import torch.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import MODEL_ONNX
from modelkiln.errors import ConfigError
from modelkiln.onnxexport import quiet_root_logger
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.kv_export import write_kv_graph
from modelkiln.optimize.quantize import _OnnxVariant, cpu_has_int8_dot
from modelkiln.optimize.registry import VARIANTS, BuildContext

if TYPE_CHECKING:
    import numpy as np

    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.quant_options import CalibrationConfig

Feed = dict[str, "np.ndarray"]
QUANT_OPS = ["MatMul", "Gemm"]


def no_calibration_error() -> ConfigError:
    """The error raised when static quantization gets no calibration batches."""
    return ConfigError(
        "no calibration data for static quantization (onnx-int8-static got no training "
        "batches and no samples)",
        hint="give the optimize stage training data (optimize.data.train_batches > 0) or real "
        "sample batches, or use onnx-int8-dynamic, which needs none",
    )


def reduce_range_here(cfg: OptimizeConfig) -> bool:
    """``onnx.reduce_range`` resolved: 'auto' = 7-bit weights on CPUs without int8 dot products."""
    rr = cfg.onnx.reduce_range
    return not cpu_has_int8_dot() if rr == "auto" else bool(rr)


def feeds_from_batches(onnx_path: Path, batches: Sequence[dict[str, Any]]) -> list[Feed]:
    """Numpy feeds for the graph's inputs (a missing ``token_type_ids`` becomes zeros)."""
    import onnxruntime as ort

    from modelkiln.optimize.runners import _default_input

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = []
    for batch in batches:
        ids = batch["input_ids"]
        feeds.append(
            {
                n: (batch[n] if batch.get(n) is not None else _default_input(n, ids)).cpu().numpy()
                for n in names
            }
        )
    return feeds


def static_quantize_onnx(
    src: Path, dst: Path, feeds: Sequence[Feed], calib: CalibrationConfig, reduce_range: bool
) -> None:
    """QDQ int8 ``quantize_static`` of ``src`` into ``dst``, calibrated on ``feeds``.

    Raises:
        ConfigError: ``feeds`` is empty.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not feeds:
        raise no_calibration_error()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> Feed | None:
            return next(self._it, None)

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calib.method]
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if calib.method == "percentile":
        extra["CalibPercentile"] = calib.percentile
    # The calibrator writes its augmented model next to the input: work on a copy in tmp.
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp, quiet_root_logger():
        local = Path(tmp) / MODEL_ONNX
        shutil.copyfile(src, local)
        quantize_static(
            str(local),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANT_OPS,
            per_channel=calib.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            extra_options=extra,
        )


@VARIANTS.register("onnx-int8-static")
class OnnxInt8StaticVariant(_OnnxVariant):
    """ONNX Runtime static int8 (QDQ): activation ranges calibrated on real batches."""

    family = "quantization"
    tolerance = Tolerance(min_snr_db=10.0)
    summary = "ONNX Runtime static int8 (QDQ, calibrated activations, per-channel weights)"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Export, calibrate, ``quantize_static``; the same for the KV graph (causal LMs)."""
        calib = ctx.cfg.quant.calibration
        # Training batches first: ``samples`` may come from the held-out evaluation texts, and
        # calibrating on the data the gate then measures would flatter the variant.
        source = "train_batches" if ctx.train_batches else "samples"
        batches = (ctx.train_batches or ctx.samples)[: calib.max_batches]
        if not batches:
            raise no_calibration_error()
        reduce = reduce_range_here(ctx.cfg)
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = self._export(ctx, raw)
            feeds = feeds_from_batches(raw, batches)
            static_quantize_onnx(raw, out / MODEL_ONNX, feeds, calib, reduce)
        kv = write_kv_graph(
            ctx,
            out,
            lambda src, dst: static_quantize_onnx(
                src, dst, kv_calibration_feeds(src, batches), calib, reduce
            ),
        )
        self._finish(ctx, out)
        return {
            "format": "onnx",
            "outputs": outputs,
            "opset": ctx.cfg.onnx.opset,
            "calibration": calib.method,
            "calibration_batches": len(batches),
            "calibration_source": source,
            "per_channel": calib.per_channel,
            "reduce_range": reduce,
            "kv_cache": kv,
        }


def kv_calibration_feeds(kv_path: Path, batches: Sequence[dict[str, Any]]) -> list[Feed]:
    """Calibration feeds for a KV-cache graph: each batch's prefill and a decode continuation.

    The first half of each batch is a prefill (empty past); the fp32 graph's
    ``present`` outputs then feed the second half as its past, so the ranges
    cover both phases. Padded rows are cut to the shortest row (no left padding).
    """
    from modelkiln.optimize.kv_export import OrtKvGenerator, positions_from_mask

    gen = OrtKvGenerator(kv_path)
    feeds: list[Feed] = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        length = int(mask.sum(1).min()) if mask is not None else ids.shape[1]
        ids = ids[:, :length].numpy()
        cut = max(1, length // 2)
        first_mask = ids[:, :cut] * 0 + 1
        first = {"input_ids": ids[:, :cut], "attention_mask": first_mask,
                 "position_ids": positions_from_mask(first_mask, cut)}  # fmt: skip
        feeds.append(first | gen.empty_past(ids.shape[0]))
        if length - cut < 1:
            continue
        _, past = gen.step(first["input_ids"], first_mask, gen.empty_past(len(ids)))
        full_mask = ids * 0 + 1
        second = {"input_ids": ids[:, cut:], "attention_mask": full_mask,
                  "position_ids": positions_from_mask(full_mask, length - cut)}  # fmt: skip
        feeds.append(second | past)
    return feeds
