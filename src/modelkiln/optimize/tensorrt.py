"""TensorRT through ONNX Runtime's TensorRT execution provider (NVIDIA GPUs only).

``onnx-tensorrt``: the plain fp32 ONNX export (the same graph as
``onnx-fp32`` before CPU fusions, which TensorRT does not need), run by an ORT
session whose providers are ``TensorrtExecutionProvider`` (fp16 kernels when
``quant.tensorrt_fp16``; engines cached in ``trt_cache/`` of the variant
directory) then ``CUDAExecutionProvider``. It needs ``onnxruntime-gpu`` with
TensorRT libraries and a CUDA device; elsewhere :meth:`OnnxTensorRtVariant.unsupported`
says why, and the variant is never built.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import MODEL_ONNX
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.quantize import _OnnxVariant
from modelkiln.optimize.registry import VARIANTS, BuildContext

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.runners import ModelInfo, Runner

TRT_PROVIDER = "TensorrtExecutionProvider"


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (one line), or None when ORT's TensorRT EP and CUDA exist."""
    import onnxruntime as ort

    if TRT_PROVIDER not in ort.get_available_providers():
        return (
            "needs onnxruntime-gpu with the TensorRT execution provider and an NVIDIA GPU "
            f"(this onnxruntime offers: {', '.join(ort.get_available_providers())})"
        )
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible)"
    return None


def trt_providers(path: Path, fp16: bool) -> list[Any]:
    """ORT providers: TensorRT (engine cache in ``path/trt_cache``), then CUDA as fallback."""
    cache = path / "trt_cache"
    cache.mkdir(exist_ok=True)
    options = {
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
    }
    return [(TRT_PROVIDER, options), "CUDAExecutionProvider"]


class _TrtRunnerFactory:
    @staticmethod
    def make(onnx_path: Path, spec: ModelInfo, fp16: bool) -> Runner:
        import onnxruntime as ort
        import torch

        from modelkiln.optimize.runners import Runner

        session = ort.InferenceSession(
            str(onnx_path), providers=trt_providers(onnx_path.parent, fp16)
        )
        names = tuple(i.name for i in session.get_inputs())
        first = session.get_outputs()[0].name

        class TrtRunner(Runner):
            def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
                arrays = {k: v.detach().cpu().numpy() for k, v in feed.items() if k in names}
                return torch.from_numpy(session.run([first], arrays)[0])

        return TrtRunner(spec, names)


@VARIANTS.register("onnx-tensorrt")
class OnnxTensorRtVariant(_OnnxVariant):
    """ONNX Runtime + TensorRT EP (fp16 allowed) on an NVIDIA GPU."""

    family = "export"
    tolerance = Tolerance(min_snr_db=25.0)
    summary = "ONNX Runtime TensorRT EP (GPU only; fp16 kernels allowed)"

    def unsupported(self, spec: ModelInfo) -> str | None:
        """Unavailable without the TensorRT EP and a CUDA device."""
        return tensorrt_unavailable()

    def not_default_here(self) -> str | None:
        """Left out where TensorRT cannot run."""
        return tensorrt_unavailable()

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Export fp32 ONNX; the TensorRT engine is built (and cached) on first load."""
        import shutil

        fp16 = ctx.cfg.quant.tensorrt_fp16
        with tempfile.TemporaryDirectory(prefix="kiln-onnx-") as tmp:
            raw = Path(tmp) / MODEL_ONNX
            outputs = self._export(ctx, raw)
            shutil.copyfile(raw, out / MODEL_ONNX)
        (out / "tensorrt.json").write_text(json.dumps({"fp16": fp16}))
        self._finish(ctx, out)
        return {"format": "onnx", "outputs": outputs, "tensorrt_fp16": fp16, "kv_cache": False}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """A session on the TensorRT EP (engine built on first call, then cached)."""
        from modelkiln.optimize.quantize import _spec

        fp16 = bool(json.loads((path / "tensorrt.json").read_text())["fp16"])
        return _TrtRunnerFactory.make(path / MODEL_ONNX, _spec(path), fp16)
