"""Settings of the pruning methods: :class:`PruneConfig`, the optimize config's ``prune`` field.

Importing this module does not import torch.

Example:
    >>> cfg = PruneConfig(target_sparsity=0.5, criterion="taylor", schedule_steps=3)
    >>> cfg.cubic_schedule()
    [0.3518518518518518, 0.48148148148148145, 0.5]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError

Criterion = Literal["l1", "l2", "taylor"]
Structure = Literal["ffn", "heads", "ffn+heads"]


def check_sparsity(value: float, what: str = "target_sparsity") -> float:
    """Return ``value`` if it lies in (0, 1) exclusive.

    Raises:
        ConfigError: ``value`` is <= 0 or >= 1 (the message names it).
    """
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(
            f"{what} must lie in (0, 1) exclusive, got {value!r}",
            hint="give the share of weights to remove, e.g. 0.5 for half",
        )
    return float(value)


class PruneConfig(KilnModel):
    """Pruning: what to remove, how to score it, the schedule, recovery and the ratio search."""

    method: Literal["unstructured", "structured"] = Field(
        "structured",
        description="Default of prune_model(): 'unstructured' (zeroed weights, same shapes) or "
        "'structured' (neurons / heads physically removed: a smaller dense model). The "
        "variants prune-unstructured / prune-structured / prune-evo fix their own method.",
    )
    target_sparsity: float = Field(
        0.5,
        description="Share removed, in (0, 1) exclusive: of the prunable weights (unstructured) "
        "or of the FFN neurons / attention heads per layer (structured).",
    )
    structure: Structure = Field(
        "ffn",
        description="Structured: remove FFN neurons, attention heads (Llama-style models, whose "
        "config has head_dim) or both.",
    )
    criterion: Criterion = Field(
        "taylor",
        description="Importance: 'l1' / 'l2' weight norm, or 'taylor' (|w * grad| summed over "
        "the training batches; on MiniLM, 50% of the FFN cut in one shot keeps MRR@10 at 0.98 "
        "of dense with taylor, 0.83 with l2, 0.79 with l1).",
    )
    schedule_steps: int = Field(
        3, ge=1, description="Gradual pruning steps (cubic schedule); the last hits the target."
    )
    recovery_steps: int = Field(
        8, ge=0, description="Recovery fine-tune steps after each pruning step (0: none)."
    )
    recovery_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the recovery.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (recovery).")
    taylor_batches: int = Field(
        4, ge=1, description="Training batches the Taylor importance is accumulated over."
    )
    search_population: int = Field(8, ge=2, description="Evolutionary search: population size.")
    search_generations: int = Field(
        6, ge=1, description="Evolutionary search: generations (at most)."
    )
    search_budget_s: float = Field(
        60.0, gt=0, description="Evolutionary search: stop after this many seconds."
    )
    search_tournament: int = Field(3, ge=2, description="Tournament size of the selection.")
    search_mutation: float = Field(
        0.08, gt=0, description="Std of the Gaussian mutation of a layer's ratio."
    )
    search_max_ratio: float = Field(
        0.95, gt=0, lt=1, description="No layer is pruned beyond this share."
    )
    search_holdout_batches: int = Field(
        1, ge=1, description="Training batches held out to score candidates (not trained on)."
    )
    compression_weight: float = Field(
        0.1,
        ge=0,
        description="Fitness = agreement with the reference + this x achieved sparsity.",
    )
    seed: int = Field(0, description="Seed of the search and of the batch order.")

    @field_validator("target_sparsity")
    @classmethod
    def _sparsity_open_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"target_sparsity must lie in (0, 1) exclusive, got {value!r}")
        return value

    def cubic_schedule(self) -> list[float]:
        """Sparsity after each step: ``s_t = s (1 - (1 - t/n)^3)`` (Zhu & Gupta); last = target."""
        n, s = self.schedule_steps, self.target_sparsity
        return [s if t == n else s * (1.0 - (1.0 - t / n) ** 3) for t in range(1, n + 1)]
