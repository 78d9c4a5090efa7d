"""int4 weight-only quantization of causal LMs with ONNX Runtime ``MatMulNBits``.

``onnx-int4-weight``: the ONNX export with every weight ``MatMul`` replaced by
``com.microsoft.MatMulNBits`` (4-bit weights in blocks of
``quant.int4.block_size`` along the input dimension, one fp32 scale per block;
:class:`~modelkiln.optimize.quant_options.Int4Config`). It has CPU kernels
(with ``accuracy_level=4`` the activations are quantized to int8 per block
and the dot products run in int8), so it runs here, unlike torchao's int4
layouts, which need CUDA or ARM kernels.

GPT-2's ``Conv1D`` layers export as ``Gemm``, which ``MatMulNBits`` does not
cover: they are swapped for equal ``nn.Linear`` (``MatMul`` + ``Add``) first.
The output projection (``lm_head``) keeps fp32 weights unless
``quant.int4.quantize_lm_head``: it is tied to the input embedding in most
small LMs and its error lands directly on the logits.

Weight-only int4 pays off where decoding is memory-bound (causal LMs); for
encoders, which are compute-bound, it is marked unsupported.
Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import MODEL_ONNX
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.kv_export import write_kv_graph
from modelkiln.optimize.quantize import _OnnxVariant, swap_conv1d
from modelkiln.optimize.registry import VARIANTS, BuildContext

if TYPE_CHECKING:
    from modelkiln.optimize.quant_options import Int4Config
    from modelkiln.optimize.runners import ModelInfo


def output_matmuls(onnx_path: Path) -> list[str]:
    """Names of the ``MatMul`` nodes writing a graph output (the LM head)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.output) & outputs]


def int4_quantize_onnx(src: Path, dst: Path, cfg: Int4Config) -> int:
    """Write ``src`` with its weight ``MatMul`` nodes as int4 ``MatMulNBits``; return how many."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from modelkiln.onnxexport import quiet_root_logger

    exclude = [] if cfg.quantize_lm_head else output_matmuls(src)
    algo = DefaultWeightOnlyQuantConfig(
        block_size=cfg.block_size,
        is_symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level,
    )
    with quiet_root_logger():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            nodes_to_exclude=exclude,
            algo_config=algo,
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)


@VARIANTS.register("onnx-int4-weight")
class OnnxInt4WeightVariant(_OnnxVariant):
    """ONNX Runtime int4 weight-only (``MatMulNBits``, blockwise scales): causal LMs only."""

    family = "quantization"
    tolerance = Tolerance(min_snr_db=8.0)
    summary = "ONNX Runtime int4 weight-only (MatMulNBits, block-wise scales; causal LMs)"

    def unsupported(self, spec: ModelInfo) -> str | None:
        """Encoders are compute-bound: int4 weight-only targets memory-bound LM decoding."""
        if spec.task != "causal-lm":
            return (
                "int4 weight-only targets memory-bound causal-LM decoding; encoders are "
                "compute-bound (use onnx-int8-dynamic / onnx-int8-static)"
            )
        return None

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Export (Conv1D swapped for Linear), then ``MatMulNBitsQuantizer``; same for KV graph."""
        from modelkiln.optimize.export import export_onnx

        cfg = ctx.cfg.quant.int4
        model = swap_conv1d(copy.deepcopy(ctx.reference)).eval()
        onnx = ctx.cfg.onnx
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = export_onnx(model, ctx.spec, raw, opset=onnx.opset, exporter=onnx.exporter)
            count = int4_quantize_onnx(raw, out / MODEL_ONNX, cfg)
        swapped = copy.copy(ctx)
        swapped.reference = model
        kv = write_kv_graph(swapped, out, lambda src, dst: int4_quantize_onnx(src, dst, cfg))
        self._finish(ctx, out)
        return {
            "format": "onnx",
            "outputs": outputs,
            "opset": onnx.opset,
            "bits": 4,
            "block_size": cfg.block_size,
            "symmetric": cfg.symmetric,
            "accuracy_level": cfg.accuracy_level,
            "quantized_matmuls": count,
            "lm_head_quantized": cfg.quantize_lm_head,
            "kv_cache": kv,
        }
