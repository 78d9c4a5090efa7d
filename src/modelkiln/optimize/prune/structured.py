"""Structured pruning: physically remove FFN neurons and attention heads.

Supported blocks, found by their module names:

* BERT-style encoders (BERT, MiniLM, RoBERTa, ...): ``layer.intermediate.dense`` produces the
  FFN neurons, ``layer.output.dense`` consumes them;
* GPT-2: ``mlp.c_fc`` / ``mlp.c_proj`` (``Conv1D``, weights stored input x output);
* Llama-style (Llama, Mistral, Qwen2, ...): ``gate_proj`` and ``up_proj`` produce,
  ``down_proj`` consumes; attention heads in whole key/value groups (``q_proj``, ``k_proj``,
  ``v_proj`` rows, ``o_proj`` columns).

Why FFN widths stay uniform across layers: transformers reads one ``intermediate_size`` (GPT-2:
``n_inner``) for every layer, so a directory with per-layer widths would not reload with
``from_pretrained``. Every layer therefore keeps the same number of neurons, each layer its own
most important ones. Heads likewise: transformers 5 dropped ``pruned_heads``, and BERT / GPT-2
derive the head size from ``hidden_size / num_attention_heads``, so removing heads there cannot be
described by their configs; Llama-style configs carry ``head_dim``, so a uniform number of
key/value groups per layer reloads exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from modelkiln.errors import ConfigError
from modelkiln.optimize.prune.config import Criterion
from modelkiln.optimize.prune.training import accumulate_taylor


@dataclass
class Part:
    """One layer of a prunable group and the weight axis its units lie along."""

    module: Any
    axis: int
    """Axis of ``module.weight`` holding the units."""
    bias: bool
    """True when the bias is indexed by the units too (layers producing them)."""


@dataclass
class Group:
    """A set of units (FFN neurons or key/value head groups) removed together across its parts."""

    name: str
    kind: str
    """``"ffn"`` or ``"heads"``."""
    parts: list[Part]
    units: int
    attention: Any = None
    heads_per_unit: int = 1
    head_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _producer(layer: Any) -> Part:
    """A layer whose outputs are the units (Linear: weight rows; Conv1D: weight columns)."""
    return Part(layer, 1 if isinstance(layer, Conv1D) else 0, True)


def _consumer(layer: Any) -> Part:
    """A layer whose inputs are the units (Linear: weight columns; Conv1D: weight rows)."""
    return Part(layer, 0 if isinstance(layer, Conv1D) else 1, False)


def _width(part: Part) -> int:
    return int(part.module.weight.shape[part.axis])


def ffn_groups(model: torch.nn.Module) -> list[Group]:
    """The FFN blocks of ``model``, in layer order.

    Raises:
        ConfigError: no supported FFN block was found.
    """
    groups = []
    for name, module in model.named_modules():
        parts: list[Part] = []
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            parts = [_producer(module.gate_proj), _producer(module.up_proj)]
            parts.append(_consumer(module.down_proj))
        elif isinstance(getattr(module, "c_fc", None), Conv1D) and hasattr(module, "c_proj"):
            parts = [_producer(module.c_fc), _consumer(module.c_proj)]
        elif hasattr(getattr(module, "intermediate", None), "dense") and hasattr(
            getattr(module, "output", None), "dense"
        ):
            parts = [_producer(module.intermediate.dense), _consumer(module.output.dense)]
        if parts:
            groups.append(Group(name, "ffn", parts, _width(parts[0])))
    if not groups:
        raise ConfigError(
            f"no FFN block found in {type(model).__name__}",
            hint="structured pruning supports BERT-style encoders, GPT-2 and Llama-style models; "
            "use prune-unstructured for other architectures",
        )
    return groups


def head_groups(model: torch.nn.Module) -> list[Group]:
    """Attention blocks of a Llama-style model, one unit per key/value head group.

    Raises:
        ConfigError: the model's config cannot describe removed heads (BERT, GPT-2) or no
            q/k/v/o attention block was found.
    """
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or not hasattr(text, "head_dim") or not hasattr(text, "num_key_value_heads"):
        raise ConfigError(
            f"attention heads of {type(model).__name__} cannot be removed loadably",
            hint="transformers 5 has no pruned_heads and BERT / GPT-2 derive the head size from "
            "hidden_size / num_attention_heads; use prune.structure='ffn' for this model",
        )
    head_dim = int(text.head_dim)
    rep = int(text.num_attention_heads) // int(text.num_key_value_heads)
    groups = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            parts = [_producer(module.q_proj), _producer(module.k_proj)]
            parts += [_producer(module.v_proj), _consumer(module.o_proj)]
            units = _width(parts[1]) // head_dim
            groups.append(Group(name, "heads", parts, units, module, rep, head_dim))
    if not groups:
        raise ConfigError(
            f"no q/k/v/o attention block found in {type(model).__name__}",
            hint="use prune.structure='ffn'",
        )
    return groups


def _per_unit(tensor: torch.Tensor, axis: int, units: int, power: int) -> torch.Tensor:
    """Sum of ``|tensor|^power`` per unit along ``axis`` (units are contiguous slices)."""
    flat = tensor.detach().float().movedim(axis, 0).reshape(units, -1)
    return flat.abs().pow(power).sum(dim=1)


def group_params(groups: list[Group]) -> list[torch.nn.Parameter]:
    """Every weight and unit-indexed bias of the groups (Taylor scores are taken on these)."""
    params = []
    for g in groups:
        for p in g.parts:
            params.append(p.module.weight)
            if p.bias and p.module.bias is not None:
                params.append(p.module.bias)
    return params


def unit_scores(
    groups: list[Group],
    criterion: Criterion,
    taylor: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Importance of every unit of every group (higher = keep).

    Args:
        groups: from :func:`ffn_groups` / :func:`head_groups`.
        criterion: ``l1`` / ``l2``: norm of the unit's weights over all its parts (producer rows
            and consumer columns); ``taylor``: sum of ``|w * grad|`` over the unit's weights
            and biases, as accumulated by :func:`taylor_for`.
        taylor: the scores of :func:`taylor_for` (needed for ``taylor``).
    """
    if criterion == "taylor" and taylor is None:
        raise ConfigError("taylor importance needs gradient scores", hint="call taylor_for first")
    it = iter(taylor or [])
    out = []
    for g in groups:
        score = torch.zeros(g.units)
        for p in g.parts:
            weight = p.module.weight
            has_bias = p.bias and p.module.bias is not None
            if criterion == "taylor":
                score += _per_unit(next(it), p.axis, g.units, 1)
                if has_bias:
                    score += _per_unit(next(it), 0, g.units, 1)
            else:
                score += _per_unit(weight, p.axis, g.units, 1 if criterion == "l1" else 2)
        out.append(score.sqrt() if criterion == "l2" else score)
    return out


def taylor_for(
    model: torch.nn.Module,
    groups: list[Group],
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
) -> list[torch.Tensor]:
    """``|w * grad|`` accumulated over ``batches`` for the parameters of ``groups``.

    Raises:
        ConfigError: no batches.
    """
    return accumulate_taylor(model, group_params(groups), batches, causal)


def _keep_index(units: torch.Tensor, size: int) -> torch.Tensor:
    """Element indices of the kept units, each ``size`` wide."""
    return (units[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _select(part: Part, units: torch.Tensor, total: int) -> None:
    """Keep only ``units`` of ``part`` (in place: weight, bias, feature counts)."""
    layer = part.module
    size = _width(part) // total
    index = _keep_index(units, size)
    weight = layer.weight.detach().index_select(part.axis, index).clone()
    layer.weight = torch.nn.Parameter(weight)
    if part.bias and layer.bias is not None:
        layer.bias = torch.nn.Parameter(layer.bias.detach()[index].clone())
    if isinstance(layer, Conv1D):
        layer.nx, layer.nf = weight.shape
    elif isinstance(layer, torch.nn.Linear):
        layer.out_features, layer.in_features = weight.shape


def remove_units(group: Group, keep: torch.Tensor) -> None:
    """Physically remove every unit of ``group`` not in ``keep`` (unit indices)."""
    keep = torch.sort(keep.long()).values
    for part in group.parts:
        _select(part, keep, group.units)
    group.units = int(keep.numel())


def prune_groups(groups: list[Group], keep: int, scores: list[torch.Tensor]) -> None:
    """Keep the ``keep`` highest-scoring units of every group (uniform width, own choice)."""
    for g, score in zip(groups, scores, strict=True):
        if keep < g.units:
            remove_units(g, torch.topk(score, keep).indices)


def update_config(model: torch.nn.Module, ffn_width: int | None, kv_heads: int | None) -> None:
    """Describe the new shapes in ``model.config`` so ``from_pretrained`` rebuilds them."""
    config: Any = model.config
    if ffn_width is not None:
        if hasattr(config, "n_inner"):  # GPT-2
            config.n_inner = ffn_width
        else:
            config.intermediate_size = ffn_width
    if kv_heads is not None:
        rep = config.num_attention_heads // config.num_key_value_heads
        config.head_dim = int(config.head_dim)
        config.num_key_value_heads = kv_heads
        config.num_attention_heads = kv_heads * rep


def keep_count(original: int, sparsity: float) -> int:
    """Units kept when ``sparsity`` of ``original`` are removed (at least one)."""
    return max(1, original - round(sparsity * original))


def prune_structured_step(
    model: torch.nn.Module,
    kinds: list[str],
    original: dict[str, int],
    sparsity: float,
    criterion: Criterion,
    batches: list[dict[str, torch.Tensor]],
    causal: bool,
) -> dict[str, int]:
    """Prune ``model`` so each kind keeps ``keep_count(original[kind], sparsity)`` units per layer.

    Returns:
        The width per kind after the step (FFN neurons, key/value head groups).
    """
    widths = {}
    for kind in kinds:
        groups = ffn_groups(model) if kind == "ffn" else head_groups(model)
        taylor = taylor_for(model, groups, batches, causal) if criterion == "taylor" else None
        keep = keep_count(original[kind], sparsity)
        prune_groups(groups, keep, unit_scores(groups, criterion, taylor))
        widths[kind] = keep
    update_config(model, widths.get("ffn"), widths.get("heads"))
    return widths


def original_widths(model: torch.nn.Module, kinds: list[str]) -> dict[str, int]:
    """Units per layer before pruning: FFN neurons and key/value head groups.

    Raises:
        ConfigError: the layers do not all have the same width (the result would not reload).
    """
    out = {}
    for kind in kinds:
        groups = ffn_groups(model) if kind == "ffn" else head_groups(model)
        widths = {g.units for g in groups}
        if len(widths) != 1:
            raise ConfigError(
                f"the {kind} widths differ across layers ({sorted(widths)})",
                hint="structured pruning keeps one width for all layers; start from a model "
                "whose layers have equal widths",
            )
        out[kind] = widths.pop()
    return out


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
