"""Edge export: one self-contained PyTorch program file, no transformers needed to run it.

* ``torch-export``: ``torch.export.export`` with dynamic batch / sequence
  dimensions, saved with ``torch.export.save`` as ``model.pt2``; reload with
  ``torch.export.load("model.pt2").module()`` (ExecuTorch / AOTInductor start
  from this program).
* ``torchscript``: ``torch.jit.trace`` saved as ``model.pt``; reload with
  ``torch.jit.load("model.pt")`` (also from C++ / LibTorch). Tracing records one
  path: the example has a padded row, so the attention-mask path is traced.

Both take the model's inputs positionally in the order of ``input_names`` in
``variant.json`` and return ``(logits,)`` (causal LMs, no KV cache) or
``(last_hidden_state,)`` (encoders). Importing this module does not import torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import StageError
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.registry import VARIANTS, BuildContext, Variant

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.runners import ModelInfo, Runner


def _main_output_module(model: torch.nn.Module, spec: ModelInfo) -> torch.nn.Module:
    """Positional inputs -> ``(main output,)`` around an HF model (eval mode kept)."""
    import torch

    class Main(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
            feed = dict(zip(spec.input_names, inputs, strict=True))
            if spec.task == "causal-lm":
                return (self.model(**feed, use_cache=False).logits,)
            return (self.model(**feed)[0],)

    return Main().eval()


def _example(spec: ModelInfo) -> tuple[torch.Tensor, ...]:
    from modelkiln.optimize.runners import synthetic_batch

    batch = synthetic_batch(spec, 2, 16, seed=1, pad_last=True)
    return tuple(batch[n] for n in spec.input_names)


class ProgramRunner:
    """Builds a :class:`~modelkiln.optimize.runners.Runner` over a loaded program (lazy torch)."""

    @staticmethod
    def make(program: Any, spec: ModelInfo) -> Runner:
        import torch

        from modelkiln.optimize.runners import Runner

        class _Runner(Runner):
            def __init__(self) -> None:
                super().__init__(spec)
                self.program = program

            def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
                with torch.inference_mode():
                    out = self.program(*(feed[n] for n in spec.input_names))
                return out[0] if isinstance(out, (tuple, list)) else out

        return _Runner()


class _EdgeVariant(Variant):
    family = "export"
    tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    weights_file: ClassVar[str] = ""

    def not_default_here(self) -> str | None:
        """An export format for other runtimes, not faster than eager here: run when named."""
        return (
            "an export format for ExecuTorch / LibTorch, not faster on this CPU: name it in methods"
        )

    def _finish(self, ctx: BuildContext, out: Path) -> None:
        from modelkiln.optimize.runners import copy_side_files

        ctx.reference.config.save_pretrained(out)  # type: ignore[union-attr, operator]
        copy_side_files(ctx.spec.path, out)

    def _fail(self, spec: ModelInfo, exc: Exception) -> StageError:
        from modelkiln.onnxexport import root_cause

        return StageError(
            f"{self.name} cannot handle {spec.architecture} ({root_cause(exc)})",
            hint="use torch-fp32 or onnx-fp32 for this model",
        )


@VARIANTS.register("torch-export")
class TorchExportVariant(_EdgeVariant):
    """``torch.export`` program (dynamic batch and sequence), saved as ``model.pt2``."""

    summary = "torch.export program (.pt2), dynamic batch / sequence"
    weights_file = "model.pt2"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """``torch.export.export`` + ``torch.export.save``."""
        import torch

        spec = ctx.spec
        module = _main_output_module(ctx.reference, spec)
        # DYNAMIC: export infers each dimension's range (the sequence is bounded by the positions).
        dim = torch.export.Dim.DYNAMIC
        shapes = (tuple({0: dim, 1: dim} for _ in spec.input_names),)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(module, _example(spec), dynamic_shapes=shapes)
        except Exception as exc:  # boundary: any export failure becomes one clear line
            raise self._fail(spec, exc) from exc
        torch.export.save(program, str(out / self.weights_file))
        self._finish(ctx, out)
        return {"format": "torch-export", "input_names": list(spec.input_names)}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``torch.export.load(...).module()``."""
        import torch

        from modelkiln.optimize.quantize import _spec

        program = torch.export.load(str(path / self.weights_file)).module()
        return ProgramRunner.make(program, _spec(path))


@VARIANTS.register("torchscript")
class TorchScriptVariant(_EdgeVariant):
    """``torch.jit.trace`` module, saved as ``model.pt`` (loadable from C++ / LibTorch)."""

    summary = "TorchScript (torch.jit.trace) module (.pt)"
    weights_file = "model.pt"

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """``torch.jit.trace`` + ``torch.jit.save``."""
        import torch

        spec = ctx.spec
        module = _main_output_module(ctx.reference, spec)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, _example(spec), check_trace=False, strict=False)
        except Exception as exc:  # boundary: any tracer failure becomes one clear line
            raise self._fail(spec, exc) from exc
        torch.jit.save(traced, str(out / self.weights_file))
        self._finish(ctx, out)
        return {"format": "torchscript", "input_names": list(spec.input_names)}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``torch.jit.load``."""
        import torch

        from modelkiln.optimize.quantize import _spec

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.jit.load(str(path / self.weights_file), map_location="cpu")
        return ProgramRunner.make(program.eval(), _spec(path))
