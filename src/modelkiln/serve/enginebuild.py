"""Building the ONNX engines of a model at first start (for :mod:`.autoengine`).

Encoders: the optimize stage has its own, fuller export (every output, graph
fusion, gates on an evaluation set); a stage may not import another stage, and
the server needs only the last hidden state of an encoder, so this is the short
version: the TorchScript exporter with dynamic batch and sequence axes (opset
17, the optimize stage's default).

Causal LMs: the KV-cache graph of the core module :mod:`modelkiln.kvgraph`
(:func:`~modelkiln.kvgraph.export_kv_onnx`), the very graph the optimize stage
ships as ``model_kv.onnx`` in its ONNX variants.

Both are then quantized by the core :func:`~modelkiln.onnxexport.quantize_int8_dynamic`
(ONNX Runtime's dynamic int8 with per-channel weights; 7-bit weights where the
CPU has no int8 dot product), the same call the optimize stage's
``onnx-int8-dynamic`` variant makes.

Example:
    >>> model = reference_model(minilm_dir)
    >>> export_encoder(model, cache / "model.onnx")
    >>> quantize_int8(cache / "model.onnx", cache / "model-int8.onnx")
    >>> export_causal_kv(gpt2_dir, cache / "model_kv.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelkiln.onnxexport import export_guard, quantize_int8_dynamic

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
    partial = _partial(target)
    quantize_int8_dynamic(source, partial)
    os.replace(partial, target)


def export_causal_kv(model_dir: Path, target: Path, model: Any = None) -> None:
    """Write the fp32 KV-cache graph of the causal LM in ``model_dir`` to ``target``.

    ``model``: the fp32 model already loaded (else loaded here).

    Raises:
        StageError: the exporter cannot trace this architecture with a cache.
    """
    from modelkiln.contract.hfmodel import inspect_model, load_torch_model
    from modelkiln.kvgraph import export_kv_onnx

    spec = inspect_model(model_dir, "causal-lm")
    partial = _partial(target)
    try:
        export_kv_onnx(model if model is not None else load_torch_model(spec), spec, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _partial(target: Path) -> Path:
    """A per-process scratch name beside ``target``: server workers starting together
    may build the same graph; each writes its own file and the last rename wins."""
    return target.with_name(f"{target.name}.{os.getpid()}.partial")
