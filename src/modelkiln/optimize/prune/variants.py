"""The registered pruning variants (family ``pruning``), saved as plain HF directories.

* ``prune-unstructured``: global magnitude (or Taylor) pruning of every Linear / Conv1D to
  ``prune.target_sparsity`` over a cubic schedule with recovery; masks made permanent, so the
  directory is a dense fp32 checkpoint with zeros (``sparsity.json`` / ``sparsity.md`` report
  per layer and globally). Not faster with dense kernels.
* ``prune-structured``: FFN neurons (and, for Llama-style models, key/value head groups)
  physically removed, uniform width per layer, ``config.json`` rewritten
  (``intermediate_size`` / ``n_inner`` / ``num_attention_heads`` + ``head_dim``): a smaller dense
  model that ``from_pretrained`` reloads and that runs faster.
* ``prune-evo``: like ``prune-unstructured`` with per-layer sparsities found by the
  evolutionary search on held-out training batches.

All three train (recovery fine-tune), so they run when named in ``methods``. Importing this
module does not import torch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ConfigError
from modelkiln.optimize.config import Tolerance
from modelkiln.optimize.registry import VARIANTS, BuildContext, Variant

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.prune.config import PruneConfig
    from modelkiln.optimize.runners import Runner


def _needs_batches(name: str, ctx: BuildContext, cfg: PruneConfig) -> None:
    if ctx.train_batches:
        return
    if cfg.recovery_steps > 0 or cfg.criterion == "taylor" or name == "prune-evo":
        raise ConfigError(
            f"{name} needs training batches (recovery / Taylor importance / search), got none",
            hint="give the optimize stage training data (optimize.data.train_batches > 0), or "
            "set prune.recovery_steps=0 with criterion 'l1' / 'l2' (not for prune-evo)",
        )


class _PruneVariant(Variant):
    """Shared build / save / load of the pruning variants."""

    family = "pruning"
    tolerance = Tolerance(atol=1e-5, rtol=1e-5)
    method = "unstructured"

    def __init__(self) -> None:
        self._pruned: torch.nn.Module | None = None

    def not_default_here(self) -> str | None:
        """Pruning trains (recovery): it runs when named in ``methods``."""
        return "trains (recovery fine-tune after each pruning step): name it in methods to run it"

    def parity_reference(self, ctx: BuildContext) -> torch.nn.Module:
        """The in-memory pruned model (the saved directory must reproduce it exactly)."""
        return self._pruned if self._pruned is not None else ctx.reference

    def _layer_ratios(self, ctx: BuildContext, info: dict[str, Any]) -> list[float] | None:
        return None

    def _batches(self, ctx: BuildContext) -> list[dict[str, torch.Tensor]]:
        return list(ctx.train_batches)

    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Prune a copy of the reference, save it as an HF directory with its report."""
        from modelkiln.optimize.prune.gradual import prune_model
        from modelkiln.optimize.prune.unstructured import write_sparsity_report
        from modelkiln.optimize.runners import copy_side_files

        cfg = ctx.cfg.prune
        _needs_batches(self.name, ctx, cfg)
        info: dict[str, Any] = {"format": "hf", "dtype": "float32"}
        ratios = self._layer_ratios(ctx, info)
        causal = ctx.spec.task == "causal-lm"
        model = copy.deepcopy(ctx.reference)
        for p in model.parameters():
            p.requires_grad_(True)
        result = prune_model(
            model,
            ctx.reference,
            cfg,
            self._batches(ctx),
            causal,
            method=self.method,
            layer_ratios=ratios,
        )
        self._pruned = result.model
        pruned: Any = result.model
        pruned.save_pretrained(out)
        copy_side_files(ctx.spec.path, out)
        (out / "prune.json").write_text(
            json.dumps({"report": result.report, "history": result.history}, indent=2)
        )
        if self.method == "unstructured":
            write_sparsity_report(result.report, out)
        return info | {"prune": result.report, "prune_history": result.history}

    def load(self, path: Path, threads: int | None = None) -> Runner:
        """``from_pretrained`` in fp32 (config.json describes the pruned shapes)."""
        from modelkiln.optimize.quantize import _spec
        from modelkiln.optimize.runners import TorchRunner, load_torch_model

        spec = _spec(path)
        return TorchRunner(load_torch_model(spec, path), spec)


@VARIANTS.register("prune-unstructured")
class PruneUnstructuredVariant(_PruneVariant):
    """Global magnitude / Taylor unstructured pruning, gradual with recovery; zeros in fp32."""

    summary = "unstructured global pruning (torch.nn.utils.prune, cubic schedule + recovery)"
    method = "unstructured"


@VARIANTS.register("prune-structured")
class PruneStructuredVariant(_PruneVariant):
    """FFN neurons / Llama head groups removed: a smaller dense HF model."""

    summary = "structured pruning: FFN neurons (+ Llama heads) removed, cubic schedule + recovery"
    method = "structured"


@VARIANTS.register("prune-evo")
class PruneEvoVariant(_PruneVariant):
    """Unstructured pruning with per-layer ratios from the evolutionary search."""

    summary = "unstructured pruning, per-layer ratios by evolutionary search + recovery"
    method = "unstructured"

    def _split(self, ctx: BuildContext) -> tuple[list[Any], list[Any]]:
        """(training batches, held-out search batches): the last batches are held out.

        With no more batches than ``search_holdout_batches`` there is nothing to hold out: the
        search then scores on the training batches themselves.
        """
        n = ctx.cfg.prune.search_holdout_batches
        batches = list(ctx.train_batches)
        if len(batches) > n:
            return batches[:-n], batches[-n:]
        return batches, batches

    def _batches(self, ctx: BuildContext) -> list[Any]:
        return self._split(ctx)[0]

    def _layer_ratios(self, ctx: BuildContext, info: dict[str, Any]) -> list[float] | None:
        from modelkiln.optimize.prune.search import evolutionary_search

        held = self._split(ctx)[1]
        result = evolutionary_search(ctx.reference, held, ctx.cfg.prune)
        info["search"] = result.to_dict()
        return result.ratios
