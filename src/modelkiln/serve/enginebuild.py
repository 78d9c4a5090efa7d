"""Building the ONNX engines of an encoder at first start (for :mod:`.autoengine`).

The optimize stage has its own, fuller export (every output, graph fusion, KV
graphs, gates on an evaluation set); a stage may not import another stage, and
the server needs only the last hidden state of an encoder, so this is the short
version: the TorchScript exporter with dynamic batch and sequence axes (opset 17,
the optimize stage's default), then ONNX Runtime's dynamic int8 quantization
with per-channel weights (7-bit weights where the CPU has no int8 dot product,
as the optimize stage does).

Example:
    >>> model = reference_model(minilm_dir)
    >>> export_encoder(model, cache / "model.onnx")
    >>> quantize_int8(cache / "model.onnx", cache / "model-int8.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelkiln.cpu import cpu_info
from modelkiln.onnxexport import export_guard, quiet_root_logger

_INPUTS = ["input_ids", "attention_mask"]


def reference_model(path: Path) -> Any:
    """The encoder in fp32, eval mode (the parity reference and the export source)."""
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()


def export_encoder(model: Any, target: Path) -> None:
    """Write ``model``'s last hidden state as an ONNX graph (dynamic batch and length).

    The example batch has a padded row so the attention-mask path is traced.

    Raises:
        StageError: the exporter cannot handle the architecture (one line naming it).
    """
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = torch.randint(5, int(model.config.vocab_size), (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    axes = {n: {0: "batch", 1: "sequence"} for n in [*_INPUTS, "last_hidden_state"]}
    arch = type(model).__name__
    partial = _partial(target)
    with export_guard(
        model, f"ONNX export cannot handle {arch}", hint="serve with --backend torch"
    ):
        torch.onnx.export(
            LastHidden().eval(), (ids, mask), str(partial), input_names=_INPUTS,
            output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
            dynamo=False,
        )  # fmt: skip
    os.replace(partial, target)  # a crash mid-export never leaves a graph that looks complete


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 (per-channel int8 weights, uint8 activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    flags = cpu_info().flags
    reduce = not any(flags.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    partial = _partial(target)
    with quiet_root_logger():
        quantize_dynamic(source, partial, per_channel=True, reduce_range=reduce,
                         weight_type=QuantType.QInt8)  # fmt: skip
    os.replace(partial, target)


def _partial(target: Path) -> Path:
    """A per-process scratch name beside ``target``: server workers starting together
    may build the same graph; each writes its own file and the last rename wins."""
    return target.with_name(f"{target.name}.{os.getpid()}.partial")
