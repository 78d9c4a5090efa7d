"""Settings of knowledge distillation: :class:`DistillConfig`, the ``distill`` field of the
optimize config.

Importing this module does not import torch.

Example:
    >>> cfg = DistillConfig(student_layers=3, stages=[4, 3], steps=200)
    >>> cfg.stage_depths(6)
    [4, 3]
    >>> default_layer_map(6, 3)
    [1, 3, 5]
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from modelkiln.configbase import FieldError, KilnModel
from modelkiln.errors import ConfigError


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers (0-based) for a student, always ending on the last one.

    6 -> 3 gives ``[1, 3, 5]`` (every other layer), 6 -> 4 gives ``[1, 2, 4, 5]``.

    Raises:
        ConfigError: ``student_layers`` is not in ``1..teacher_layers``.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(
            f"student_layers must lie in 1..{teacher_layers} (the teacher's depth), "
            f"got {student_layers}",
            hint="give a student shallower than (or as deep as) the teacher",
        )
    return [math.ceil((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


class DistillConfig(KilnModel):
    """Knowledge distillation: the student's shape and init, the losses and the training run.

    The loss of one step is a weighted sum; a weight of 0 switches a term off:

    * ``logit_weight`` (causal LMs): ``alpha * T^2 * KL(teacher_T || student_T)
      + (1 - alpha) * CE(student, next token)``, ``T = temperature``;
    * ``hidden_weight``: every student layer's output, through a learned linear
      projection to the teacher's width, against the output of the teacher layer
      it is mapped to (``hidden_loss``: MSE or 1 - cosine); the last student layer
      is mapped to the teacher's last, so this includes the final hidden states;
    * ``pooled_weight`` (encoders): 1 - cosine of the mean-pooled sentence
      embeddings (the pooling sentence-transformers' MiniLM uses);
    * ``attention_weight``: KL between the teacher's and the student's attention
      distributions of mapped layers (eager attention while training).
    """

    student_layers: int | None = Field(
        None, ge=1, description="Depth of the (final) student; None: half the teacher, rounded up."
    )
    layer_map: list[int] | None = Field(
        None,
        description="Teacher layer (0-based) each student layer starts from and is matched "
        "to; None: evenly spaced, ending on the teacher's last layer (6 -> 3: [1, 3, 5]).",
    )
    init: Literal["teacher-layers", "scratch"] = Field(
        "teacher-layers",
        description="'teacher-layers': embeddings, final norm / head and the mapped layers "
        "copied from the teacher; 'scratch': a fresh model from the teacher's config with "
        "fewer layers (and student_hidden_size), embeddings copied when the width matches.",
    )
    student_hidden_size: int | None = Field(
        None,
        ge=8,
        description="init 'scratch': student width (the FFN scales with it; heads keep their "
        "count); None: the teacher's. Hidden-state losses project it to the teacher's width.",
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T of the logit KL.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Share of the T^2-scaled KL in the logit loss (rest: LM CE)."
    )
    logit_weight: float = Field(1.0, ge=0, description="Weight of the logit loss (causal LMs).")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state loss.")
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse", description="Hidden-state distance: mean squared error or 1 - cosine per token."
    )
    pooled_weight: float = Field(
        1.0, ge=0, description="Weight of the mean-pooled embedding cosine loss (encoders)."
    )
    attention_weight: float = Field(
        0.0, ge=0, description="Weight of the attention-map KL (needs eager attention: slower)."
    )
    steps: int = Field(
        200, ge=1, description="Optimizer steps per stage over the training batches (cycled)."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of the steps with linear warmup (then linear decay)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    stages: list[int] | None = Field(
        None,
        description="Progressive distillation (distill-progressive): student depth per stage, "
        "decreasing, ending at student_layers, e.g. [4, 3]; each stage's student starts from "
        "the previous one's layers. None: one intermediate stage halfway.",
    )
    seed: int = Field(0, description="Seed of the projections and of init 'scratch'.")

    @field_validator("layer_map")
    @classmethod
    def _map_increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(b <= a for a, b in itertools.pairwise(value))):
            raise ValueError("layer_map must list teacher layers in increasing order")
        if value is not None and min(value) < 0:
            raise ValueError("layer_map entries are 0-based layer indices (>= 0)")
        return value

    @field_validator("stages")
    @classmethod
    def _stages_decreasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (
            not value or min(value) < 1 or any(b >= a for a, b in itertools.pairwise(value))
        ):
            raise ValueError("stages must be strictly decreasing depths >= 1, e.g. [4, 3]")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.layer_map is not None and self.student_layers not in (None, len(self.layer_map)):
            raise FieldError(
                "layer_map",
                f"layer_map has {len(self.layer_map)} entries but student_layers is "
                f"{self.student_layers}",
                hint="give one layer_map entry per student layer, or drop student_layers",
            )
        if self.stages and self.student_layers and self.stages[-1] != self.student_layers:
            raise FieldError(
                "stages",
                f"stages must end at student_layers ({self.student_layers})",
                hint=f"make the last stage {self.student_layers}",
            )
        return self

    def target_layers(self, teacher_layers: int) -> int:
        """Depth of the final student for a teacher of ``teacher_layers`` layers."""
        if self.layer_map is not None:
            return len(self.layer_map)
        if self.stages:
            return self.stages[-1]
        return self.student_layers or max(1, math.ceil(teacher_layers / 2))

    def stage_depths(self, teacher_layers: int) -> list[int]:
        """Student depth per progressive stage (the last is the target depth).

        Raises:
            ConfigError: a stage is not shallower than the teacher.
        """
        target = self.target_layers(teacher_layers)
        if self.stages:
            depths = list(self.stages)
        else:
            mid = (teacher_layers + target) // 2
            depths = [mid, target] if target < mid < teacher_layers else [target]
        if depths[0] >= teacher_layers or depths[-1] != target:
            raise ConfigError(
                f"progressive stages {depths} do not fit a {teacher_layers}-layer teacher "
                f"and a {target}-layer student",
                hint="give distill.stages decreasing depths below the teacher's, ending at "
                "distill.student_layers",
            )
        return depths
