"""Unstructured pruning: zero individual weights by global (or per-layer) importance.

Masks are applied with ``torch.nn.utils.prune`` (so a recovery fine-tune keeps pruned weights at
zero) and made permanent with ``prune.remove`` before saving: the saved directory is a normal
dense HF checkpoint with zeros. Prunable layers: every ``nn.Linear`` / GPT-2 ``Conv1D`` except
the output embedding and heads (``lm_head``, ``pooler``, ``classifier``, ``score``).

Zeros save no time in dense CPU kernels; the point is a sparsity that sparse kernels, sparse
storage or a later structured step can use, and measuring what a layer tolerates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from modelkiln.errors import ConfigError
from modelkiln.optimize.prune.config import Criterion
from modelkiln.optimize.prune.training import accumulate_taylor

SKIP_NAMES = ("lm_head", "pooler", "classifier", "score")


def counts_for(ratios: list[float], sizes: list[int], sparsity: float) -> list[int]:
    """Weights to zero per layer: ``round(ratio * size)``, corrected so the total is exactly
    ``round(sparsity * sum(sizes))`` (the remainder goes to the layers rounded the most)."""
    want = round(sparsity * sum(sizes))
    raw = np.asarray(ratios, dtype=np.float64) * np.asarray(sizes)
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    i = 0
    while counts.sum() != want:
        j = order[i % len(order)]
        step = 1 if counts.sum() < want else -1
        if 0 <= counts[j] + step <= sizes[j]:
            counts[j] += step
        i += 1
    return [int(c) for c in counts]


def prunable_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every prunable Linear / Conv1D, in module order.

    Raises:
        ConfigError: the model has none.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D)
        and m is not out_emb
        and not any(part in SKIP_NAMES for part in name.split("."))
    ]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no Linear / Conv1D layer to prune",
            hint="pruning applies to transformer models built from Linear or Conv1D layers",
        )
    return layers


def _scores(
    layers: list[tuple[str, Any]],
    criterion: Criterion,
    taylor: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Per-weight importance; weights already masked get -1 (they are removed first)."""
    out = []
    for i, (_, m) in enumerate(layers):
        weight = m.weight.detach().float()
        if criterion == "taylor":
            assert taylor is not None
            score = taylor[i].clone()
        else:
            score = weight.abs()  # |w| and w^2 rank the same: L1 and L2 agree per weight
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            score[mask == 0] = -1.0
        out.append(score)
    return out


def taylor_scores(
    model: torch.nn.Module,
    layers: list[tuple[str, Any]],
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
) -> list[torch.Tensor]:
    """``|w * grad|`` per weight of ``layers``, summed over ``batches``.

    Raises:
        ConfigError: no batches.
    """
    params = [_trainable_weight(m) for _, m in layers]
    return accumulate_taylor(model, params, batches, causal)


def _trainable_weight(m: Any) -> torch.nn.Parameter:
    """The weight parameter (``weight_orig`` once ``torch.nn.utils.prune`` reparametrized it)."""
    orig = getattr(m, "weight_orig", None)
    weight: torch.nn.Parameter = orig if orig is not None else m.weight
    return weight


def global_masks(scores: list[torch.Tensor], remove: int) -> list[torch.Tensor]:
    """Masks zeroing exactly the ``remove`` lowest scores across all layers together."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    drop = torch.topk(flat, remove, largest=False, sorted=False).indices
    keep = torch.ones_like(flat)
    keep[drop] = 0.0
    return [
        m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)
    ]


def layer_masks(scores: list[torch.Tensor], removes: list[int]) -> list[torch.Tensor]:
    """Masks zeroing exactly ``removes[i]`` lowest scores of layer ``i``."""
    masks = []
    for s, k in zip(scores, removes, strict=True):
        keep = torch.ones(s.numel())
        if k > 0:
            keep[torch.topk(s.reshape(-1), k, largest=False, sorted=False).indices] = 0.0
        masks.append(keep.view_as(s))
    return masks


def nested_counts(counts: list[int], already: list[int]) -> list[int]:
    """Per-layer counts no lower than the weights each layer has masked already, same total.

    Successive steps only add zeros; where rounding asks a layer for fewer than it already has,
    the difference is taken from the layers with the most room (total unchanged, so exact).
    """
    out = [max(c, a) for c, a in zip(counts, already, strict=True)]
    excess = sum(out) - sum(counts)
    for i in sorted(range(len(out)), key=lambda j: already[j] - out[j]):
        take = min(excess, out[i] - already[i])
        out[i] -= take
        excess -= take
    return out


def apply_masks(layers: list[tuple[str, Any]], masks: list[torch.Tensor]) -> None:
    """Attach the masks with ``torch.nn.utils.prune`` (combined with any mask already there)."""
    for (_, m), mask in zip(layers, masks, strict=True):
        prune.custom_from_mask(m, "weight", mask.to(m.weight.dtype))


def make_permanent(layers: list[tuple[str, Any]]) -> None:
    """Fold the masks into the weights (``prune.remove``): plain parameters with zeros."""
    for _, m in layers:
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def prune_unstructured_step(
    model: torch.nn.Module,
    sparsity: float,
    criterion: Criterion,
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
    layer_ratios: list[float] | None = None,
) -> int:
    """Mask weights until exactly ``round(sparsity * N)`` of the N prunable weights are zero.

    Args:
        layer_ratios: per-layer sparsities (e.g. from the evolutionary search); their
            weight-count-weighted mean must round to the same total (see
            :func:`counts_for`). None: one global ranking.

    Returns:
        The number of masked weights.
    """
    layers = prunable_layers(model)
    taylor = taylor_scores(model, layers, batches, causal) if criterion == "taylor" else None
    scores = _scores(layers, criterion, taylor)
    sizes = [s.numel() for s in scores]
    total = round(sparsity * sum(sizes))
    if layer_ratios is None:
        masks = global_masks(scores, total)
    else:
        already = [int((s < 0).sum()) for s in scores]
        masks = layer_masks(
            scores, nested_counts(counts_for(layer_ratios, sizes, sparsity), already)
        )
    apply_masks(layers, masks)
    return total


def sparsity_report(model: torch.nn.Module) -> dict[str, Any]:
    """Zeros per prunable layer and overall (after :func:`make_permanent` or with masks on)."""
    rows = []
    zeros_all = size_all = 0
    for name, m in prunable_layers(model):
        weight = m.weight.detach()
        zeros, size = int((weight == 0).sum()), weight.numel()
        rows.append({"layer": name, "params": size, "zeros": zeros, "sparsity": zeros / size})
        zeros_all, size_all = zeros_all + zeros, size_all + size
    everything = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "global_sparsity": zeros_all / size_all,
        "prunable_params": size_all,
        "zeros": zeros_all,
        "model_params": everything,
        "model_sparsity": zeros_all / everything,
        "layers": rows,
    }


def write_sparsity_report(report: dict[str, Any], out: Path) -> None:
    """``sparsity.json`` and ``sparsity.md`` (a per-layer table) in ``out``."""
    (out / "sparsity.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"Global sparsity of the prunable layers: {report['global_sparsity']:.4f} "
        f"({report['zeros']} / {report['prunable_params']} weights); whole model "
        f"{report['model_sparsity']:.4f}.",
        "",
        "| layer | params | zeros | sparsity |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{r['layer']}` | {r['params']} | {r['zeros']} | {r['sparsity']:.4f} |"
        for r in report["layers"]
    ]
    (out / "sparsity.md").write_text("\n".join(lines) + "\n")
