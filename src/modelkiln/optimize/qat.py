"""Quantization-aware training (torchao QAT), deployed as ONNX Runtime dynamic int8.

``qat-int8``:

1. prepare: torchao ``QATConfig(activation_config=..., weight_config=...)``
   swaps every ``nn.Linear`` (GPT-2 ``Conv1D`` first becomes ``nn.Linear``)
   for a ``FakeQuantizedLinear`` that simulates *exactly the scheme ONNX
   Runtime's dynamic int8 runs*: weights int8 per output channel, symmetric
   (int7 where ``reduce_range`` is on: CPUs without VNNI), activations uint8
   asymmetric, ranges taken per call (per token: torchao QAT has no per-tensor
   activation granularity; ORT uses one range per tensor);
2. a short fine-tune (``quant.qat.steps`` AdamW steps) on ``ctx.train_batches``:
   causal LMs on next-token loss, encoders on the MSE to the fp32 reference's
   hidden states (self-distillation, no labels needed);
3. convert: ``QATConfig(step="convert")`` swaps the fake-quantized layers back
   to ``nn.Linear`` with the learned weights; the model is exported to ONNX and
   quantized with ``quantize_dynamic`` (same bits, same granularity).

Why ONNX Runtime int8 and not torchao's int8 tensors: on this AVX2 CPU (no
VNNI / AMX) torchao's int8 kernels run 10-40x slower than fp32, while ORT's
int8 GEMMs are fast. The scheme is dynamic, so there are no learned activation
ranges to carry over: weight ranges are the per-channel max of the learned
weights in both, and activation ranges are taken per call in both. The output
projection (tied to the embedding) stays fp32 in training and in ORT.

Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import MODEL_ONNX
from modelkiln.errors import ConfigError
from modelkiln.onnxexport import quiet_root_logger
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.int4 import output_matmuls
from modelkiln.optimize.kv_export import write_kv_graph
from modelkiln.optimize.quant_static import QUANT_OPS, reduce_range_here
from modelkiln.optimize.quantize import _OnnxVariant, _output_embedding_filter, swap_conv1d
from modelkiln.optimize.registry import VARIANTS, BuildContext

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.quant_options import QatConfig


def prepare_qat(model: torch.nn.Module, reduce_range: bool) -> torch.nn.Module:
    """Swap Conv1D -> Linear, then Linear -> torchao FakeQuantizedLinear (not the LM head)."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    swap_conv1d(model)
    weights = IntxFakeQuantizeConfig(
        torch.int7 if reduce_range else torch.int8,  # type: ignore[attr-defined]
        "per_channel",
        is_symmetric=True,
    )
    # ORT takes one range per tensor; torchao QAT fake-quantizes activations per token at the
    # finest (no per-tensor granularity), so training sees slightly less activation noise.
    activations = IntxFakeQuantizeConfig(torch.uint8, "per_token", is_symmetric=False)
    config = QATConfig(activation_config=activations, weight_config=weights, step="prepare")
    quantize_(model, config, filter_fn=_output_embedding_filter(model))
    return model


def convert_qat(model: torch.nn.Module) -> torch.nn.Module:
    """FakeQuantizedLinear -> nn.Linear carrying the learned weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))
    return model.eval()


def qat_finetune(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
    cfg: QatConfig,
) -> list[float]:
    """Train ``model`` (fake-quantized) for ``cfg.steps`` steps; return the loss per step."""
    import torch

    # Eval mode while training: dropout off, so the short fine-tune sees only the quantization
    # noise (encoders match the fp32 teacher exactly where quantization allows).
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    names = ("input_ids", "attention_mask", "token_type_ids")
    for batch in itertools.islice(itertools.cycle(batches), cfg.steps):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        feed = {k: v for k, v in batch.items() if k in names}
        if causal:
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(**feed, labels=labels, use_cache=False).loss
        else:
            with torch.no_grad():
                target = reference(**feed)[0]
            keep = mask.bool()
            loss = torch.nn.functional.mse_loss(model(**feed)[0][keep], target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@VARIANTS.register("qat-int8")
class QatInt8Variant(_OnnxVariant):
    """torchao quantization-aware fine-tune, then ONNX Runtime dynamic int8 with the same scheme."""

    family = "quantization"
    tolerance = Tolerance(min_snr_db=10.0)
    summary = "QAT (torchao fake-quant fine-tune) -> ONNX Runtime dynamic int8"

    def __init__(self) -> None:
        self._trained: torch.nn.Module | None = None

    def not_default_here(self) -> str | None:
        """QAT trains: it runs when named in ``methods``."""
        return "trains (quant.qat.steps fine-tune steps): name it in methods to run it"

    def parity_reference(self, ctx: BuildContext) -> torch.nn.Module:
        """The fine-tuned fp32 model (QAT changes the weights on purpose; the gate judges that)."""
        return self._trained if self._trained is not None else ctx.reference

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Prepare, fine-tune, convert, export, ``quantize_dynamic``."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from modelkiln.optimize.export import export_onnx

        if not ctx.train_batches:
            raise ConfigError(
                "qat-int8 needs training batches, got none",
                hint="give the optimize stage training data (optimize.data.train_batches > 0) "
                "or use onnx-int8-static / onnx-int8-dynamic, which do not train",
            )
        reduce = reduce_range_here(ctx.cfg)
        model = prepare_qat(copy.deepcopy(ctx.reference), reduce)
        causal = ctx.spec.task == "causal-lm"
        losses = qat_finetune(model, ctx.reference, ctx.train_batches, causal, ctx.cfg.quant.qat)
        self._trained = convert_qat(model)
        onnx = ctx.cfg.onnx

        def quantize(src: Path, dst: Path) -> None:
            with quiet_root_logger():
                quantize_dynamic(
                    src,
                    dst,
                    per_channel=True,
                    reduce_range=reduce,
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=QUANT_OPS,
                    nodes_to_exclude=output_matmuls(src) if causal else [],
                )

        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = export_onnx(model, ctx.spec, raw, opset=onnx.opset, exporter=onnx.exporter)
            quantize(raw, out / MODEL_ONNX)
        kv = write_kv_graph(ctx, out, quantize, model=model)
        self._finish(ctx, out)
        return {
            "format": "onnx",
            "outputs": outputs,
            "opset": onnx.opset,
            "qat_steps": len(losses),
            "qat_loss_first": losses[0],
            "qat_loss_last": losses[-1],
            "reduce_range": reduce,
            "kv_cache": kv,
        }
