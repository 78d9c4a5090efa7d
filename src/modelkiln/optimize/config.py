"""The ``optimize`` stage's config: which variants, which target, gate thresholds, benchmark shapes.

Variants are chosen by name from :data:`modelkiln.optimize.registry.VARIANTS`
(``kiln optimize --help`` lists them); an unknown name is an error that lists
the valid ones. Importing this module does not import torch.

Example:
    >>> cfg = OptimizeConfig(methods=["onnx-fp32", "onnx-int8-dynamic"], target="auto")
    >>> cfg.gate.threshold("quantization")
    0.99
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from modelkiln.configbase import FieldError, KilnModel, load_section
from modelkiln.optimize.distill.config import DistillConfig
from modelkiln.optimize.prune.config import PruneConfig
from modelkiln.optimize.quant_options import QuantExtraConfig
from modelkiln.optimize.tolerance import Family, Tolerance

__all__ = [
    "BenchConfig",
    "Family",
    "GateConfig",
    "OnnxConfig",
    "OptimizeConfig",
    "OptimizeDataConfig",
    "Tolerance",
    "load_optimize_config",
]


class GateConfig(KilnModel):
    """Quality gate: a variant's quality / the baseline's quality must reach the threshold."""

    quantization: float = Field(
        0.99, gt=0, description="Minimum quality ratio for quantized variants (bf16, int8)."
    )
    export: float = Field(
        0.99, gt=0, description="Minimum quality ratio for exported fp32 variants (ONNX)."
    )
    pruning: float = Field(0.97, gt=0, description="Minimum quality ratio for pruned variants.")
    distillation: float = Field(
        0.97, gt=0, description="Minimum quality ratio for distilled variants."
    )
    require_parity: bool = Field(
        True, description="Reject a variant whose outputs miss its parity tolerance."
    )
    evaluate_slow: bool = Field(
        False,
        description="Also measure the quality of variants stopped as too slow under "
        "target 'auto' (costly, and auto can never choose them).",
    )

    def threshold(self, family: Family) -> float:
        """The ratio a variant of ``family`` must reach (the baseline needs none: 0.0)."""
        return 0.0 if family == "baseline" else float(getattr(self, family))


class BenchConfig(KilnModel):
    """Latency benchmark: shapes, warmup and bounds (variants run interleaved, round-robin)."""

    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 32], min_length=1, description="Batch sizes to time."
    )
    seq_lengths: list[int] = Field(
        default_factory=lambda: [128], min_length=1, description="Tokens per sequence to time."
    )
    warmup: int = Field(1, ge=0, description="Untimed runs per variant and shape.")
    min_runs: int = Field(3, ge=1, description="Timed runs per variant and shape, at least.")
    max_runs: int = Field(20, ge=1, description="Timed runs per variant and shape, at most.")
    max_seconds: float = Field(
        30.0, gt=0, description="Stop adding rounds for a shape after this many seconds."
    )
    threads: int | None = Field(
        None, ge=1, description="torch / ONNX Runtime intra-op threads; None: leave as is."
    )
    slow_abort: float = Field(
        3.0,
        gt=1,
        description="Stop timing a variant once it is this many times slower than the baseline "
        "(it can never be chosen; bf16 on a CPU without AMX is ~10-40x slower).",
    )
    objective: Literal["throughput", "latency"] = Field(
        "throughput",
        description="What 'auto' ranks by: throughput at the largest batch, or p50 latency at "
        "the smallest batch (both at the longest sequence).",
    )

    @field_validator("batch_sizes", "seq_lengths")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError("every batch size and sequence length must be >= 1")
        return sorted(set(value))

    @model_validator(mode="after")
    def _runs_ordered(self) -> BenchConfig:
        if self.max_runs < self.min_runs:
            raise FieldError(
                "max_runs",
                f"max_runs ({self.max_runs}) < min_runs ({self.min_runs})",
                hint="set max_runs >= min_runs",
            )
        return self


class OnnxConfig(KilnModel):
    """ONNX export and ONNX Runtime settings."""

    opset: int = Field(17, ge=14, le=23, description="ONNX opset of the export.")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript",
        description="torch.onnx exporter: 'torchscript' (fast, ~0.5 s for MiniLM) or 'dynamo' "
        "(torch.export based, ~10 s).",
    )
    graph_optimization: Literal["fusion", "basic", "none"] = Field(
        "fusion",
        description="'fusion': onnxruntime.transformers fusions (attention, layer norm, GELU) "
        "for BERT / GPT-2 graphs, ORT basic optimisation for others; 'basic': ORT basic only.",
    )
    per_channel: bool = Field(True, description="int8: one weight scale per output channel.")
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="int8: 7-bit weights. 'auto' = on where the CPU has no VNNI / AMX-int8: "
        "ORT's AVX2 u8s8 kernels add product pairs in int16 and can saturate with 8-bit "
        "weights (MiniLM MRR@10 ratio 0.989 without, 1.001 with, same speed).",
    )


class OptimizeDataConfig(KilnModel):
    """Which real data the ``optimize`` stage measures quality on and trains with.

    Quality is measured on held-out data the model never trained on: the corpus
    ``test`` split (causal LMs: perplexity) or the code-search pairs' ``test``
    split (encoders: MRR@10). Methods that train (pruning recovery, distillation,
    QAT) get batches from the ``train`` split.
    """

    eval_texts: int = Field(
        48, ge=2, description="Held-out corpus chunks for perplexity (causal LMs)."
    )
    eval_pairs: int = Field(
        400, ge=2, description="Held-out docstring->code pairs for MRR@10 (encoders)."
    )
    max_length: int = Field(128, ge=8, description="Tokens per evaluation text.")
    chunk_chars: int = Field(
        1500, ge=100, description="Corpus files are cut into chunks of this many characters."
    )
    train_batches: int = Field(
        32, ge=0, description="Training batches offered to methods that train (0: none)."
    )
    train_batch_size: int = Field(8, ge=1, description="Sequences per training batch.")
    train_seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")


class OptimizeConfig(KilnModel):
    """Stage ``optimize``: build variants, check parity, benchmark, gate, choose, report."""

    methods: list[str] | None = Field(
        None,
        description="Variant names to build (see VARIANTS); None: every variant that suits the "
        "model and this machine (bf16 only where bf16 is fast).",
    )
    target: str = Field(
        "auto",
        description="'auto' (fastest variant that passes the gate and beats the baseline) or "
        "one variant name (built, gated, promoted or rejected).",
    )
    baseline: str = Field("torch-fp32", description="The reference variant for ratios.")
    task: Literal["auto", "encoder", "causal-lm"] = Field(
        "auto", description="Model kind; 'auto' reads config.json's architectures."
    )
    min_speedup: float = Field(
        1.05,
        ge=1.0,
        description="'auto' only chooses a variant at least this much faster than the baseline "
        "(margin against timing noise); else it keeps the baseline.",
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    tolerances: dict[str, Tolerance] = Field(
        default_factory=dict, description="Per-variant parity tolerance overrides, by name."
    )
    layer_error: bool = Field(
        True, description="Write a per-layer int8 error report (MSE, SNR, max abs) for int8."
    )
    data: OptimizeDataConfig = Field(
        default_factory=OptimizeDataConfig,
        description="Held-out evaluation data and training batches (pipeline stage and CLI).",
    )
    quant: QuantExtraConfig = Field(
        default_factory=QuantExtraConfig,
        description="Static int8 calibration, QAT, int4 and TensorRT settings.",
    )
    prune: PruneConfig = Field(
        default_factory=PruneConfig,
        description="Pruning: target sparsity, structure, criterion, schedule, recovery, search.",
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig,
        description="Distillation: student depth / layer map, losses and weights, T, alpha, "
        "steps, progressive stages.",
    )
    seed: int = Field(0, description="Seed of synthetic inputs.")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        from modelkiln.optimize.registry import VARIANTS

        for name in value:
            VARIANTS.check(name)
        if len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value

    @field_validator("baseline")
    @classmethod
    def _known_baseline(cls, value: str) -> str:
        from modelkiln.optimize.registry import VARIANTS

        VARIANTS.check(value)
        return value

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value != "auto":
            from modelkiln.optimize.registry import VARIANTS

            VARIANTS.check(value)
        return value

    @field_validator("tolerances")
    @classmethod
    def _known_tolerances(cls, value: dict[str, Tolerance]) -> dict[str, Tolerance]:
        from modelkiln.optimize.registry import VARIANTS

        for name in value:
            VARIANTS.check(name)
        return value


def load_optimize_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> OptimizeConfig:
    """Validate an optimize config from a YAML file or a mapping, plus ``a.b=value`` overrides.

    Raises:
        ConfigError: the file is missing or malformed, or a field (e.g. a method name) is invalid;
            the message names the field, the bad value and the valid choices.
    """
    return load_section(OptimizeConfig, source, overrides, label="optimize config")
