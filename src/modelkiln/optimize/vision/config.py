"""Settings of the CNN path: :class:`CnnOptimizeConfig` (this module does not import torch).

Example:
    >>> cfg = CnnOptimizeConfig(epochs=3, prune_ratio=0.5)
    >>> cfg.student_channels
    [8, 16, 16]
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError


def _widths(value: list[int], what: str) -> list[int]:
    if not value or any(int(c) < 1 for c in value):
        raise ConfigError(
            f"{what} must be a non-empty list of positive channel counts, got {value!r}",
            hint="give one output width per conv block, e.g. [16, 32, 32]",
        )
    return [int(c) for c in value]


class CnnOptimizeConfig(KilnModel):
    """The digits CNN, its training and every optimization applied to it."""

    seed: int = Field(0, description="Seed of the split, the initial weights and the shuffling.")
    test_size: float = Field(
        0.25, gt=0.0, lt=1.0, description="Share of the 1797 digits images held out (stratified)."
    )
    channels: list[int] = Field(
        [16, 32, 32], description="Output widths of the teacher's conv-BN-ReLU blocks."
    )
    epochs: int = Field(8, ge=1, description="Training epochs of the fp32 model.")
    batch_size: int = Field(64, ge=1, description="Training batch size (every phase).")
    lr: float = Field(3e-3, gt=0.0, description="AdamW learning rate (every phase).")
    prune_ratio: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each conv block's output channels removed."
    )
    prune_criterion: Literal["l1", "taylor"] = Field(
        "l1",
        description="Channel importance: 'l1' (norm of the filter) or 'taylor' (|sum w * grad| "
        "over training batches, summed per output channel).",
    )
    finetune_epochs: int = Field(
        3, ge=0, description="Recovery fine-tune epochs after pruning (0 = none)."
    )
    student_channels: list[int] = Field(
        [8, 16, 16], description="Output widths of the distilled student's conv blocks."
    )
    kd_epochs: int = Field(10, ge=1, description="Distillation epochs of the student.")
    kd_temperature: float = Field(4.0, gt=0.0, description="Softmax temperature of the KD loss.")
    kd_alpha: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Weight of the soft (teacher) loss; 1 - alpha weighs the label loss.",
    )
    calibration_batches: int = Field(
        8, ge=1, description="Training batches (of batch_size) that calibrate static int8."
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit int8 weights: 'auto' = on when the CPU has no VNNI / AMX-int8 (ORT's "
        "AVX2 u8s8 kernel can saturate with full 8-bit weights).",
    )
    threads: int = Field(2, ge=1, description="Threads of torch and ONNX Runtime when timing.")
    batch_sizes: list[int] = Field([1, 64], description="Batch sizes timed (p50 latency).")
    timing_rounds: int = Field(
        5, ge=1, description="Interleaved timing rounds (every variant once per round)."
    )
    timing_calls: int = Field(20, ge=1, description="Timed calls per variant, shape and round.")

    @field_validator("channels", "student_channels")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        return _widths(value, "channels")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ConfigError(
                f"batch_sizes must be positive, got {value!r}", hint="e.g. batch_sizes: [1, 64]"
            )
        return value


def load_cnn_config(
    source: str | Path | None = None, overrides: list[str] | None = None
) -> CnnOptimizeConfig:
    """Validate CNN settings from YAML (a bare mapping or a ``cnn:`` section) plus overrides.

    Raises:
        ConfigError: the file is missing or malformed, or a field is invalid (the message
            names the field, the bad value and the fix).
    """
    from modelkiln.configbase import load_section

    return load_section(CnnOptimizeConfig, source, overrides, section="cnn", label="cnn config")
