"""Model transforms of the CNN path: conv-BN fusion, channel pruning, logit distillation.

Pruning works on sequential CNNs (``nn.Sequential``, nested ones flattened; e.g.
:class:`~modelkiln.optimize.vision.model.DigitsCNN`): each ``Conv2d`` loses its least
important output channels, and so do the ``BatchNorm2d`` after it and the input of the next
layer that reads them (a ``Conv2d``, or a ``Linear`` after ``Flatten``, whose input columns
are channel-major: column ``c * H * W + i`` belongs to channel ``c``). Layers in between must
act per channel (activations, pooling, dropout). The result is a smaller dense model.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from modelkiln.errors import ConfigError
from modelkiln.optimize.vision.model import DigitsData, eval_mode, train_classifier

# Layers that keep channels apart: pruning may look through them.
PER_CHANNEL = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d, nn.Flatten,
)  # fmt: skip


def _flat(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of a sequential model's leaves in forward order."""
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"channel pruning / fusion by layer order needs an nn.Sequential model, got "
            f"{type(model).__name__}",
            hint="build the CNN as nn.Sequential (like DigitsCNN)",
        )
    out: list[tuple[nn.Module, str, nn.Module]] = []
    for name, child in model.named_children():
        out += _flat(child) if isinstance(child, nn.Sequential) else [(model, name, child)]
    return out


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the conv before it.

    Sequential models keep their class (the BatchNorm slot becomes ``nn.Identity``, the conv
    gains a bias), so a fused :class:`DigitsCNN` checkpoints as ``DigitsCNN(batch_norm=False)``;
    other modules go through ``torch.fx``'s conv-BN fusion (a ``GraphModule``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = eval_mode(copy.deepcopy(model))
    if not isinstance(fused, nn.Sequential):
        from torch.fx.experimental.optimization import fuse

        return fuse(fused)
    layers = _flat(fused)
    for (parent, name, conv), (bn_parent, bn_name, bn) in itertools.pairwise(layers):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(parent, name, fuse_conv_bn_eval(conv, bn))
            setattr(bn_parent, bn_name, nn.Identity())
    return fused


@dataclass
class PruneReport:
    """What :func:`prune_channels` removed: widths before / after and the kept indices."""

    before: list[int]
    after: list[int]
    kept: list[list[int]] = field(repr=False)
    params_before: int = 0
    params_after: int = 0


def channel_importance(
    model: nn.Module,
    criterion: Literal["l1", "taylor"] = "l1",
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
) -> list[torch.Tensor]:
    """One score per output channel of each ``Conv2d`` in forward order (higher = keep).

    'l1': L1 norm of the channel's filter. 'taylor': ``|sum(w * dL/dw)|`` over the channel's
    conv (and BatchNorm scale) parameters, summed over ``batches`` (first-order estimate of
    the loss change when the channel is removed).

    Raises:
        ConfigError: 'taylor' without batches, or an unknown criterion.
    """
    convs = [m for _, _, m in _flat(model) if isinstance(m, nn.Conv2d)]
    if criterion == "l1":
        return [c.weight.detach().abs().sum(dim=(1, 2, 3)) for c in convs]
    if criterion != "taylor":
        raise ConfigError(f"unknown pruning criterion {criterion!r}", hint="use 'l1' or 'taylor'")
    layers = [m for _, _, m in _flat(model)]
    bns = {
        i: layers[i + 1]
        for i, m in enumerate(layers[:-1])
        if isinstance(m, nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d)
    }
    pairs = [(m, bns.get(i)) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    scores = [torch.zeros(c.out_channels) for c in convs]
    was_training, seen = model.training, 0
    eval_mode(model)  # fixed BatchNorm statistics: score the model that will be pruned
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for k, (conv, bn) in enumerate(pairs):
            assert conv.weight.grad is not None
            s = (conv.weight * conv.weight.grad).sum(dim=(1, 2, 3))
            if (
                isinstance(bn, nn.BatchNorm2d)
                and bn.weight is not None
                and bn.weight.grad is not None
            ):
                s = s + bn.weight * bn.weight.grad
            scores[k] += s.detach().abs()
        seen += 1
    model.zero_grad(set_to_none=True)
    nn.Module.train(model, was_training)
    if not seen:
        raise ConfigError(
            "taylor channel importance needs training batches, got none",
            hint="pass batches=data.batches(64), or use criterion='l1'",
        )
    return scores


def _conv_like(
    conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Conv2d:
    if conv.groups != 1:
        raise ConfigError(
            f"channel pruning supports plain convs only, got groups={conv.groups}",
            hint="prune a model without grouped / depthwise convolutions",
        )
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    # A copy keeps stride / padding / dilation / padding_mode; only the tensors shrink.
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(w.clone(memory_format=torch.contiguous_format))
    new.out_channels, new.in_channels = int(w.shape[0]), int(w.shape[1])
    if conv.bias is not None:
        b = conv.bias.detach()
        new.bias = nn.Parameter((b[out_idx] if out_idx is not None else b).contiguous().clone())
    return new


def _bn_like(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    src, dst = bn.state_dict(), new.state_dict()
    new.load_state_dict({k: (v[idx] if v.dim() == 1 else v) for k, v in src.items() if k in dst})
    return new


def _linear_like(lin: nn.Linear, channels: int, idx: torch.Tensor) -> nn.Linear:
    if lin.in_features % channels:
        raise ConfigError(
            f"Linear({lin.in_features}) after Flatten does not split into {channels} channels",
            hint="the layer before Flatten must output the pruned conv's channels",
        )
    spatial = lin.in_features // channels
    # Flatten is channel-major: channel c owns columns c*spatial ... c*spatial + spatial - 1.
    cols = (idx[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None)
    new.weight.data.copy_(lin.weight.detach()[:, cols])
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach())
    return new


def prune_channels(
    model: nn.Module,
    ratio: float,
    criterion: Literal["l1", "taylor"] = "l1",
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
) -> tuple[nn.Module, PruneReport]:
    """A copy of ``model`` with ``ratio`` of every conv's output channels physically removed.

    Every conv that feeds a later conv or linear layer is pruned (at least one channel kept);
    the BatchNorm after it and the consumer's input shrink with it.

    Raises:
        ConfigError: ``ratio`` outside (0, 1), a non-sequential model, or a layer between a
            conv and its consumer that mixes channels.
    """
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"prune ratio must lie in (0, 1) exclusive, got {ratio!r}", hint="e.g. 0.5 for half"
        )
    pruned = eval_mode(copy.deepcopy(model))
    scores = iter(channel_importance(pruned, criterion, batches))
    layers = _flat(pruned)
    params_before = sum(p.numel() for p in pruned.parameters())
    report = PruneReport(before=[], after=[], kept=[], params_before=params_before)
    channels = 0
    pending: torch.Tensor | None = None  # kept input channels of the next conv / linear
    for i, (parent, name, layer) in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            score = next(scores)
            consumer = _consumer(layers, i)
            keep = None
            if consumer is not None:
                n_keep = max(1, round(layer.out_channels * (1.0 - ratio)))
                keep = torch.topk(score, n_keep).indices.sort().values
                report.before.append(layer.out_channels)
                report.after.append(n_keep)
                report.kept.append(keep.tolist())
            setattr(parent, name, _conv_like(layer, keep, pending))
            pending, channels = keep, layer.out_channels
        elif isinstance(layer, nn.BatchNorm2d) and pending is not None:
            setattr(parent, name, _bn_like(layer, pending))
        elif isinstance(layer, nn.Linear) and pending is not None:
            setattr(parent, name, _linear_like(layer, channels, pending))
            pending = None
    report.params_after = sum(p.numel() for p in pruned.parameters())
    return pruned, report


def _consumer(layers: list[tuple[nn.Module, str, nn.Module]], i: int) -> nn.Module | None:
    """The conv / linear that reads conv ``i``'s channels (None if the conv is the output)."""
    for _, _, layer in layers[i + 1 :]:
        if isinstance(layer, nn.Conv2d | nn.Linear):
            return layer
        if not isinstance(layer, (*PER_CHANNEL, nn.BatchNorm2d)):
            raise ConfigError(
                f"cannot prune through {type(layer).__name__}: it may mix channels",
                hint="channel pruning supports conv / BatchNorm / activation / pooling / "
                "flatten / linear stacks",
            )
    return None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton logit distillation: ``alpha * T^2 * KL(teacher_T || student_T) + (1-alpha) * CE``."""
    t = temperature
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = nn.functional.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: DigitsData,
    *,
    epochs: int,
    temperature: float = 4.0,
    alpha: float = 0.7,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``student`` in place on the teacher's logits (and the labels); per-epoch losses."""
    eval_mode(teacher)

    def loss(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images)
        return kd_loss(logits, target, labels, temperature, alpha)

    return train_classifier(
        student, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss
    )
