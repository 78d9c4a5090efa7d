"""Gradual (iterative) pruning with recovery: the library entry point :func:`prune_model`.

The sparsity follows the cubic schedule of Zhu & Gupta (2017), ``s_t = s (1 - (1 - t/n)^3)``
for ``t = 1..n``: large steps first while the model has redundancy to spare, small ones near
the target; the last step lands exactly on the target. After every step a short recovery
fine-tune (:func:`~modelkiln.optimize.prune.training.recover`) repairs the damage: encoders
distil toward the unpruned reference's hidden states, causal LMs train on the LM loss.

Example:
    >>> result = prune_model(model, reference, PruneConfig(target_sparsity=0.5), batches, False)
    ... # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modelkiln.errors import StageError
from modelkiln.optimize.prune.config import PruneConfig, check_sparsity
from modelkiln.optimize.prune.structured import (
    original_widths,
    parameter_count,
    prune_structured_step,
)
from modelkiln.optimize.prune.training import recover
from modelkiln.optimize.prune.unstructured import (
    make_permanent,
    prunable_layers,
    prune_unstructured_step,
    sparsity_report,
)

KINDS = {"ffn": ["ffn"], "heads": ["heads"], "ffn+heads": ["ffn", "heads"]}


@dataclass
class PruneResult:
    """The pruned model (modified in place), its report and the per-step history."""

    model: torch.nn.Module
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def prune_model(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    cfg: PruneConfig,
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
    *,
    method: str | None = None,
    layer_ratios: list[float] | None = None,
) -> PruneResult:
    """Prune ``model`` in place to ``cfg.target_sparsity`` over ``cfg.schedule_steps`` steps.

    Args:
        model: the model to prune (a copy of the reference; modified in place).
        reference: the unpruned model, the recovery teacher of encoders (not modified).
        cfg: target, structure, criterion, schedule and recovery settings.
        batches: training batches (recovery and Taylor importance); may be empty when neither
            is used (``recovery_steps=0`` and an ``l1`` / ``l2`` criterion).
        causal: True for causal LMs (LM loss), False for encoders (distillation).
        method: ``"unstructured"`` or ``"structured"``; None: ``cfg.method``.
        layer_ratios: unstructured only: per-layer sparsities (e.g. from
            :func:`~modelkiln.optimize.prune.search.evolutionary_search`).

    Raises:
        ConfigError: bad sparsity, unsupported architecture / structure, or Taylor importance
            without batches.
        StageError: the reached sparsity differs from the target (a bug; never silent).
    """
    check_sparsity(cfg.target_sparsity)
    method = method or cfg.method
    taylor_batches = batches[: cfg.taylor_batches]
    history: list[dict[str, Any]] = []
    if method == "structured":
        kinds = KINDS[cfg.structure]
        orig = original_widths(model, kinds)
        before = parameter_count(model)
        widths = dict(orig)
        for step, s in enumerate(cfg.cubic_schedule(), start=1):
            widths = prune_structured_step(
                model, kinds, orig, s, cfg.criterion, taylor_batches, causal
            )
            losses = _recover(model, reference, cfg, batches, causal)
            history.append({"step": step, "sparsity": s, "widths": widths} | losses)
        report: dict[str, Any] = {
            "method": "structured",
            "structure": cfg.structure,
            "criterion": cfg.criterion,
            "original_widths": orig,
            "widths": widths,
            "unit_sparsity": {k: 1 - widths[k] / orig[k] for k in kinds},
            "params_before": before,
            "params_after": parameter_count(model),
        }
        report["param_reduction"] = 1 - report["params_after"] / before
    else:
        for step, s in enumerate(cfg.cubic_schedule(), start=1):
            ratios = None
            if layer_ratios is not None:
                ratios = [r * s / cfg.target_sparsity for r in layer_ratios]
            masked = prune_unstructured_step(
                model, s, cfg.criterion, taylor_batches, causal, ratios
            )
            losses = _recover(model, reference, cfg, batches, causal)
            history.append({"step": step, "sparsity": s, "masked": masked} | losses)
        make_permanent(prunable_layers(model))
        report = {"method": "unstructured", "criterion": cfg.criterion} | sparsity_report(model)
        want = round(cfg.target_sparsity * report["prunable_params"])
        if report["zeros"] != want:
            raise StageError(
                f"unstructured pruning reached {report['zeros']} zeros, expected {want}",
                hint="report this: the masks of successive steps must be nested",
            )
        report["per_layer_ratios"] = layer_ratios is not None
    report["target_sparsity"] = cfg.target_sparsity
    report["schedule"] = cfg.cubic_schedule()
    return PruneResult(model.eval(), report, history)


def _recover(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    cfg: PruneConfig,
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
) -> dict[str, float]:
    losses = recover(
        model, reference, batches, causal, cfg.recovery_steps, cfg.recovery_lr, cfg.max_grad_norm
    )
    return {"loss_first": losses[0], "loss_last": losses[-1]} if losses else {}
