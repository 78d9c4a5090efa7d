"""The built-in variants: fp32 / bf16 / torchao int8 in PyTorch, fp32 / int8 in ONNX Runtime.

* ``torch-fp32``: HF directory, fp32 safetensors; ``AutoModel.from_pretrained(dir)``.
* ``torch-bf16``: HF directory, bf16 safetensors; ``AutoModel.from_pretrained(dir)``.
* ``torch-int8-dynamic``: torchao ``Int8Tensor`` safetensors; see
  :class:`TorchInt8DynamicVariant` for how it reloads.
* ``onnx-fp32``: ``model.onnx`` (ORT-fused graph); ``onnxruntime.InferenceSession``.
* ``onnx-int8-dynamic``: ``model.onnx`` (ORT dynamic int8); ``onnxruntime.InferenceSession``.

Every directory also holds ``config.json``, the tokenizer / pooling files of
the source, and ``variant.json``; :func:`load_variant` reloads any of them.
Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.contract import MODEL_ONNX
from modelkiln.contract.variants import TORCHAO_WEIGHTS, load_torchao_linear, swap_conv1d
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.registry import VARIANTS, BuildContext, Variant

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.runners import ModelInfo, Runner


def _spec(path: Path) -> ModelInfo:
    from modelkiln.optimize.runners import inspect_model, read_variant_json

    return inspect_model(path, read_variant_json(path)["task"])


def _save_hf(model: torch.nn.Module, ctx: BuildContext, out: Path) -> None:
    from modelkiln.optimize.runners import copy_side_files

    model.save_pretrained(out)  # type: ignore[operator]
    copy_side_files(ctx.spec.path, out)


@VARIANTS.register("torch-fp32")
class TorchFp32Variant(Variant):
    """The fp32 PyTorch model re-saved: the baseline every ratio refers to."""

    family = "baseline"
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)
    summary = "PyTorch eager, fp32 (baseline)"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Save the reference model and the tokenizer in HF format."""
        _save_hf(ctx.reference, ctx, out)
        return {"format": "hf", "dtype": "float32"}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``from_pretrained`` in fp32."""
        from modelkiln.optimize.runners import TorchRunner, load_torch_model

        spec = _spec(path)
        return TorchRunner(load_torch_model(spec, path), spec)


@VARIANTS.register("torch-bf16")
class TorchBf16Variant(Variant):
    """All weights and activations in bfloat16 (fast only with AMX / AVX512-bf16 or a GPU)."""

    family = "quantization"
    tolerance = Tolerance(min_snr_db=25.0)
    summary = "PyTorch eager, bf16 weights and compute"

    def not_default_here(self) -> str | None:
        """Left out by default where bf16 has no fast kernel (AVX2-only CPUs)."""
        from modelkiln.hardware import precision_decision

        decision = precision_decision("auto", "cpu")  # measured here (or the forced CPU class)
        return None if decision.value == "bf16" else f"bf16 is not faster here: {decision.reason}"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Cast a copy of the reference to bf16 and save it."""
        import torch

        _save_hf(copy.deepcopy(ctx.reference).to(torch.bfloat16), ctx, out)
        return {"format": "hf", "dtype": "bfloat16"}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``from_pretrained`` in bf16; outputs are cast to fp32."""
        import torch

        from modelkiln.optimize.runners import TorchRunner, load_torch_model

        spec = _spec(path)
        return TorchRunner(load_torch_model(spec, path, dtype=torch.bfloat16), spec)


@VARIANTS.register("torch-int8-dynamic")
class TorchInt8DynamicVariant(Variant):
    """torchao int8 dynamic quantization: int8 per-channel weights, int8 per-token activations.

    Every ``nn.Linear`` is quantized except the output embedding (tied to the
    input embedding in most LMs). Reload:

    * models built from ``nn.Linear`` (BERT, Llama, ...): the directory is a
      transformers torchao checkpoint, ``AutoModel.from_pretrained(dir)``
      restores the ``Int8Tensor`` weights (torchao must be installed);
    * GPT-2-style ``Conv1D`` models: torchao cannot quantize ``Conv1D``, so
      they are swapped for equivalent ``nn.Linear`` first; transformers cannot
      rebuild that module tree, so reload with :func:`load_variant` (it builds
      the model from ``config.json``, swaps the layers and loads the
      torchao-flattened ``model.safetensors``).
    """

    family = "quantization"
    tolerance = Tolerance(min_snr_db=10.0)
    summary = "PyTorch eager + torchao int8 dynamic (per-channel weights, per-token activations)"
    layer_scheme: ClassVar[str] = "torchao-int8-dynamic"

    def not_default_here(self) -> str | None:
        """Left out by default on CPUs without int8 dot-product units (VNNI / AMX-int8)."""
        from modelkiln.hardware import int8_decision

        decision = int8_decision()  # measured here (or the forced CPU class)
        return None if decision.value == "int8" else f"int8 is not faster here: {decision.reason}"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Quantize (swapping Conv1D for Linear when present) and save."""
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        from modelkiln.optimize.runners import copy_side_files

        info: dict[str, Any] = {"dtype": "int8", "quant": "Int8DynamicActivationInt8WeightConfig"}
        model: torch.nn.Module
        if not _has_conv1d(ctx.reference):
            from transformers import TorchAoConfig

            from modelkiln.optimize.runners import load_torch_model

            # Quantized while transformers loads the source weights, so the saved directory is
            # a standard transformers torchao checkpoint (config.json carries the recipe).
            qcfg = TorchAoConfig(Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
            model = load_torch_model(ctx.spec, quantization_config=qcfg)
            model.save_pretrained(out)
            copy_side_files(ctx.spec.path, out)
            info |= {"format": "hf-torchao", "quantized_linears": _count_quantized(model)}
        else:
            model = _quantize_linear_swapped(copy.deepcopy(ctx.reference))
            _save_flat(model, out)
            ctx.reference.config.save_pretrained(out)  # type: ignore[union-attr, operator]
            copy_side_files(ctx.spec.path, out)
            info |= {"format": "torchao-linear", "quantized_linears": _count_quantized(model)}
        _maybe_layer_error(ctx, out, self.layer_scheme)
        return info

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``from_pretrained`` (hf-torchao) or the Conv1D->Linear loader (torchao-linear)."""
        from modelkiln.optimize.runners import TorchRunner, read_variant_json

        spec = _spec(path)
        if read_variant_json(path)["format"] == "hf-torchao":
            from modelkiln.optimize.runners import load_torch_model

            return TorchRunner(load_torch_model(spec, path, dtype=None), spec)
        return TorchRunner(load_torchao_linear(path, spec.task), spec)


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-int8)."""
    from modelkiln.cpu import cpu_info

    flags = cpu_info().flags
    return any(flags.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _has_conv1d(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _count_quantized(model: torch.nn.Module) -> int:
    from torchao.utils import TorchAOBaseTensor

    return sum(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


def _embedding(model: torch.nn.Module, getter: str) -> Any:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None."""
    fn = getattr(model, getter, None)
    return fn() if callable(fn) else None


def _output_embedding_filter(model: torch.nn.Module) -> Any:
    out_emb = _embedding(model, "get_output_embeddings")

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        import torch

        return isinstance(module, torch.nn.Linear) and module is not out_emb

    return keep


def _quantize_linear_swapped(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    swap_conv1d(model)
    quantize_(
        model,
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        filter_fn=_output_embedding_filter(model),
    )
    return model.eval()


def _save_flat(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = model.state_dict()
    tied = _tied_output_key(model)
    if tied:
        state.pop(tied, None)
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / TORCHAO_WEIGHTS, metadata)


def _tied_output_key(model: torch.nn.Module) -> str | None:
    out_emb = _embedding(model, "get_output_embeddings")
    in_emb = _embedding(model, "get_input_embeddings")
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return None
    return next(f"{n}.weight" for n, m in model.named_modules() if m is out_emb)


def _maybe_layer_error(ctx: BuildContext, out: Path, scheme: str, weight_bits: int = 8) -> None:
    if not ctx.cfg.layer_error or not ctx.samples:
        return
    from modelkiln.optimize.layer_error import layer_error_report, render_layer_error

    rows = layer_error_report(ctx.reference, ctx.samples, scheme=scheme, weight_bits=weight_bits)
    (out / "layer_error.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
    (out / "layer_error.md").write_text(render_layer_error(rows, scheme, weight_bits=weight_bits))


class _OnnxVariant(Variant):
    backend = "onnxruntime"

    def _export(self, ctx: BuildContext, path: Path) -> list[str]:
        from modelkiln.optimize.export import export_onnx

        onnx = ctx.cfg.onnx
        return export_onnx(ctx.reference, ctx.spec, path, opset=onnx.opset, exporter=onnx.exporter)

    def _finish(self, ctx: BuildContext, out: Path) -> None:
        from modelkiln.optimize.runners import copy_side_files

        ctx.reference.config.save_pretrained(out)  # type: ignore[union-attr, operator]
        copy_side_files(ctx.spec.path, out)

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """An ONNX Runtime CPU session (all graph optimisations on)."""
        from modelkiln.optimize.runners import OrtRunner

        return OrtRunner(path / MODEL_ONNX, _spec(path), threads)


@VARIANTS.register("onnx-fp32")
class OnnxFp32Variant(_OnnxVariant):
    """fp32 ONNX export, graph-optimised for ONNX Runtime, checked against PyTorch."""

    family = "export"
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    summary = "ONNX Runtime fp32 (fused graph)"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Export, optimise the graph, and record the parity of both graphs."""
        from modelkiln.optimize.export import optimize_graph, validate_onnx
        from modelkiln.optimize.kv_export import write_kv_graph

        tol = ctx.cfg.tolerances.get(self.name, self.tolerance)
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = self._export(ctx, raw)
            raw_parity = validate_onnx(ctx.reference, raw, ctx.samples, tol.atol, tol.rtol)
            level = ctx.cfg.onnx.graph_optimization
            done = optimize_graph(raw, out / MODEL_ONNX, ctx.spec, level)
        parity = validate_onnx(ctx.reference, out / MODEL_ONNX, ctx.samples, tol.atol, tol.rtol)
        kv = write_kv_graph(ctx, out)
        self._finish(ctx, out)
        return {
            "format": "onnx",
            "outputs": outputs,
            "opset": ctx.cfg.onnx.opset,
            "graph_optimization": done,
            "export_parity": raw_parity.to_dict(),
            "optimized_parity": parity.to_dict(),
            "kv_cache": kv,
        }


@VARIANTS.register("onnx-int8-dynamic")
class OnnxInt8DynamicVariant(_OnnxVariant):
    """ONNX Runtime dynamic int8: int8 weights (per channel), uint8 activations quantized per call.

    Quantizes the plain export (an ORT-fused graph needs a tensor-type
    workaround and was not faster); ORT fuses the int8 graph at session load.
    On CPUs without VNNI / AMX-int8 the weights use 7 bits (``reduce_range``,
    see :class:`~modelkiln.optimize.config.OnnxConfig`).
    """

    family = "quantization"
    tolerance = Tolerance(min_snr_db=10.0)
    summary = "ONNX Runtime dynamic int8 (per-channel weights)"
    layer_scheme: ClassVar[str] = "ort-int8-dynamic"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Export, then ``onnxruntime.quantization.quantize_dynamic``."""
        from modelkiln.onnxexport import quantize_int8_dynamic
        from modelkiln.optimize.kv_export import write_kv_graph

        onnx = ctx.cfg.onnx
        reduce = not cpu_has_int8_dot() if onnx.reduce_range == "auto" else onnx.reduce_range

        def quantize(src: Path, dst: Path) -> None:  # the same call as the server's engine build
            quantize_int8_dynamic(src, dst, per_channel=onnx.per_channel, reduce_range=reduce)

        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = self._export(ctx, raw)
            quantize(raw, out / MODEL_ONNX)
        kv = write_kv_graph(ctx, out, quantize)
        self._finish(ctx, out)
        _maybe_layer_error(ctx, out, self.layer_scheme, weight_bits=7 if reduce else 8)
        return {
            "format": "onnx",
            "outputs": outputs,
            "opset": onnx.opset,
            "per_channel": onnx.per_channel,
            "reduce_range": reduce,
            "kv_cache": kv,
        }


def load_variant(path: str | Path, threads: int | None = None) -> Runner:
    """Load any variant directory written by :func:`modelkiln.optimize.optimize` as a runner.

    Example:
        >>> runner = load_variant("runs/q/optimize/model")
        >>> runner(**batch).last_hidden_state.shape
    """
    from modelkiln.optimize.runners import read_variant_json

    info = read_variant_json(Path(path))
    return VARIANTS.get(info["variant"])().load(Path(path), threads)
