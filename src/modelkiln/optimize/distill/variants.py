"""The registered distillation variants.

* ``distill-layers``: one stage; the student keeps ``distill.layer_map`` (default:
  evenly spaced, e.g. every other) teacher layers, or is a smaller model from
  scratch (``distill.init``), and is trained on the context's training batches.
* ``distill-progressive``: the same, in stages of decreasing depth
  (``distill.stages``, e.g. 6 -> 4 -> 3), each student starting from the last.

Both save a plain transformers directory (``config.json`` with the student's
depth, fp32 safetensors, the source's tokenizer / pooling files) that
``AutoModel.from_pretrained`` reloads. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.registry import VARIANTS, BuildContext, Variant

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.distill.core import DistillResult
    from modelkiln.optimize.runners import Runner


class _DistillVariant(Variant):
    """Shared build / load: distil, save as HF, reload with ``from_pretrained``."""

    family = "distillation"
    backend = "torch"
    # Parity is against the in-memory student: same weights through the same library, up to
    # float reassociation (training ran eager attention; the saved model uses the default).
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)
    progressive: ClassVar[bool] = False

    def __init__(self) -> None:
        self._student: torch.nn.Module | None = None

    def not_default_here(self) -> str | None:
        """Distillation trains: it runs when named in ``methods``."""
        return "trains a smaller student (distill.steps per stage): name it in methods to run it"

    def parity_reference(self, ctx: BuildContext) -> torch.nn.Module:
        """The distilled student in memory (the saved directory must reproduce it)."""
        return self._student if self._student is not None else ctx.reference

    def _distill(self, ctx: BuildContext) -> DistillResult:
        from modelkiln.optimize.distill.core import check_batches, distill, progressive_distill

        check_batches(ctx.train_batches, self.name)
        causal = ctx.spec.task == "causal-lm"
        cfg = ctx.cfg.distill
        if self.progressive:
            return progressive_distill(ctx.reference, ctx.train_batches, cfg, causal)
        return distill(ctx.reference, ctx.train_batches, cfg, causal)

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Distil a student from the reference and save it in HF format."""
        from modelkiln.optimize.distill.core import num_layers, save_student

        result = self._distill(ctx)
        self._student = result.student
        save_student(result.student, out, ctx.spec.path)
        return {
            "format": "hf",
            "dtype": "float32",
            "teacher_layers": num_layers(ctx.reference),
            "init": ctx.cfg.distill.init,
            **result.summary(),
        }

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``from_pretrained`` in fp32."""
        from modelkiln.optimize.runners import (
            TorchRunner,
            inspect_model,
            load_torch_model,
            read_variant_json,
        )

        spec = inspect_model(path, read_variant_json(path)["task"])
        return TorchRunner(load_torch_model(spec, path), spec)


@VARIANTS.register("distill-layers")
class DistillLayersVariant(_DistillVariant):
    """A shallower student (teacher layers or scratch) distilled in one stage."""

    summary = "distilled student, fewer layers (init from teacher layers), PyTorch fp32"


@VARIANTS.register("distill-progressive")
class DistillProgressiveVariant(_DistillVariant):
    """A shallower student distilled in stages of decreasing depth (e.g. 6 -> 4 -> 3)."""

    summary = "progressively distilled student (stages of decreasing depth), PyTorch fp32"
    progressive = True
