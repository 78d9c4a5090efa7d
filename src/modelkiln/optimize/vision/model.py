"""The digits CNN, scikit-learn's bundled digits images split for it, training and accuracy.

:class:`DigitsCNN` is an :class:`torch.nn.Sequential` of conv-BN-ReLU blocks (a 2x2 max-pool
after the second), a flatten and one linear layer: a plain module that the channel pruner
(:func:`~modelkiln.optimize.vision.transforms.prune_channels`) and the checkpoint format
(:mod:`~modelkiln.optimize.vision.checkpoint`) handle without special cases. Its constructor
arguments are read back from its layers (:meth:`DigitsCNN.init_kwargs`), so a fused or pruned
copy saves and reloads as a ``DigitsCNN`` of the new widths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelkiln.errors import ConfigError

IMAGE_SIZE = 8
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    """The digits images (N, 1, 8, 8) scaled to [0, 1] and their labels, split once."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(
        self, batch_size: int, *, seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches, shuffled with ``seed`` (in order when it is None)."""
        n = len(self.y_train)
        if seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.x_train[idx], self.y_train[idx]


def load_digits_split(test_size: float = 0.25, seed: int = 0) -> DigitsData:
    """scikit-learn's bundled 8x8 digits (1797 images), a stratified held-out split.

    Raises:
        ConfigError: ``test_size`` is not in (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ConfigError(
            f"test_size must lie in (0, 1), got {test_size!r}", hint="e.g. 0.25 for a quarter"
        )
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(
        range(len(y)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    tr_idx, te_idx = torch.tensor(tr), torch.tensor(te)
    return DigitsData(x[tr_idx], y[tr_idx], x[te_idx], y[te_idx])


class DigitsCNN(nn.Sequential):
    """conv3x3-BN-ReLU blocks (2x2 max-pool after the second), flatten, linear.

    Args:
        channels: output width of each conv block.
        num_classes: logits per image.
        batch_norm: BatchNorm after each conv (False: biased convs and ``nn.Identity`` in the
            BatchNorm slots, the layout of a conv-BN-fused model, so its weights load as is).
        in_channels: channels of the input images.
        image_size: height = width of the input images.
    """

    def __init__(
        self,
        channels: list[int] | tuple[int, ...] = (16, 32, 32),
        num_classes: int = NUM_CLASSES,
        *,
        batch_norm: bool = True,
        in_channels: int = 1,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        if not channels or any(int(c) < 1 for c in channels):
            raise ConfigError(
                f"DigitsCNN channels must be positive widths, got {list(channels)!r}",
                hint="give one width per conv block, e.g. [16, 32, 32]",
            )
        layers: list[nn.Module] = []
        size, prev = image_size, in_channels
        for i, width in enumerate(channels):
            layers.append(nn.Conv2d(prev, int(width), 3, padding=1, bias=not batch_norm))
            layers.append(nn.BatchNorm2d(int(width)) if batch_norm else nn.Identity())
            layers.append(nn.ReLU())
            if i == 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            prev = int(width)
        layers += [nn.Flatten(), nn.Linear(prev * size * size, num_classes)]
        super().__init__(*layers)
        self.image_size = image_size

    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layout (after fusion or pruning too)."""
        convs = [m for m in self if isinstance(m, nn.Conv2d)]
        head = self[-1]
        assert isinstance(head, nn.Linear)
        return {
            "channels": [c.out_channels for c in convs],
            "num_classes": head.out_features,
            "batch_norm": any(isinstance(m, nn.BatchNorm2d) for m in self),
            "in_channels": convs[0].in_channels,
            "image_size": self.image_size,
        }


def train_classifier(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW; returns the mean loss of each epoch.

    Args:
        model: the classifier (logits out).
        data: the split; only its training part is used.
        epochs: passes over the training images.
        batch_size: images per step.
        lr: AdamW learning rate (cosine-decayed to 0).
        seed: seed of the shuffling (epoch ``e`` uses ``seed + e``).
        loss_fn: ``loss(logits, labels, images)``; cross-entropy when None.
    """
    steps = epochs * -(-len(data.y_train) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in data.batches(batch_size, seed=seed + epoch):
            logits = model(x)
            loss = loss_fn(logits, y, x) if loss_fn else nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(y), count + len(y)
        losses.append(total / count)
    eval_mode(model)
    return losses


def eval_mode(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode, also a ``torch.export`` module (whose ``eval()`` raises)."""
    # ExportedProgram.module() replaces .eval() with a stub that raises; the base method only
    # sets the ``training`` flags (the exported graph already has its eval-mode ops).
    nn.Module.train(model, False)
    return model


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``, in batches."""
    eval_mode(model)
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor | Any, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max logit is the label (logits: tensor or numpy array)."""
    pred = torch.as_tensor(logits).argmax(dim=1)
    return float((pred == labels).float().mean())
