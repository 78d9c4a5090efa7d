"""The stage registry: every pipeline stage as a lazy entry (core; imports no stage).

A stage is a function ``run(ctx: StageContext) -> None`` that writes its
outputs into ``ctx.out`` and its numbers into ``ctx.metrics``; it may write a
``report.md`` (and PNG plots next to it) that the run report includes. A stage is
registered by name with ``"module:attr"`` strings for its run
function and its config section, so listing the stages (``kiln --help``) or
validating a pipeline config imports nothing heavy, and this core module never
imports a stage package. The pipeline config (:mod:`modelkiln.config`) is
assembled from these entries, the stage list and its order come from them, and
a new stage (built in or a plugin) joins with :func:`register_stage`.

Example:
    >>> STAGES["train"].requires
    ('data', 'tokenizer')
    >>> register_stage(StageSpec("lint", "mypkg.lint:run", config="mypkg.lint:LintConfig"))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import StageError
from modelkiln.progress import QUIET, Progress

if TYPE_CHECKING:
    from modelkiln.artifacts import Artifact
    from modelkiln.config import PipelineConfig
    from modelkiln.configbase import KilnModel

__all__ = [
    "STAGES",
    "StageContext",
    "StageSpec",
    "load_object",
    "register_stage",
    "stage_names",
]


@dataclass
class StageContext:
    """Everything a stage function gets (the contract between the engine and a stage).

    Attributes:
        pipeline: the whole pipeline config (for ``seed`` and ``run``).
        config: this stage's own config section.
        out: the (temporary) directory to write outputs into.
        inputs: finished artifacts of the stages this one requires, by name.
        metrics: numbers to record in the manifest (JSON-serialisable).
        progress: where to report progress.
    """

    pipeline: PipelineConfig
    config: KilnModel
    out: Path
    inputs: dict[str, Artifact]
    metrics: dict[str, Any]
    progress: Progress = QUIET


def load_object(entry: str) -> Any:
    """Import ``"module:attr"`` and return the attribute."""
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its entry point, its config section and what it consumes."""

    name: str
    entry: str
    requires: tuple[str, ...] = ()
    description: str = ""
    version: int = 1
    key_metrics: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    """Stages whose artifacts are passed in when this run has them (e.g. serve uses the
    optimize stage's promoted model when there is one, else the trained model)."""
    config: str = ""
    """``"module:Class"`` of the stage's config section (``PipelineConfig.<name>``)."""

    def load(self) -> Callable[[StageContext], None]:
        """Import and return the stage function."""
        fn: Callable[[StageContext], None] = load_object(self.entry)
        return fn


STAGES: dict[str, StageSpec] = {}
"""Registered stages in pipeline order (a stage comes after the ones it requires)."""


def register_stage(spec: StageSpec) -> StageSpec:
    """Add a stage after the ones registered so far (before the pipeline config is first built).

    Raises:
        StageError: the name is taken, it requires an unregistered stage, or it has no config.
    """
    if spec.name in STAGES:
        raise StageError(f"stage {spec.name!r} is registered twice", hint="pick another name")
    unknown = [r for r in (*spec.requires, *spec.optional) if r not in STAGES]
    if unknown:
        raise StageError(
            f"stage {spec.name!r} needs {', '.join(unknown)}, which is not registered before it",
            hint="register the stages it needs first",
        )
    if not spec.config:
        raise StageError(
            f"stage {spec.name!r} has no config section",
            hint="pass config='module:ConfigClass' (a KilnModel)",
        )
    STAGES[spec.name] = spec
    return spec


def stage_names() -> list[str]:
    """Every registered stage, in pipeline order."""
    return list(STAGES)


for _spec in (
    StageSpec(
        "data",
        "modelkiln.data.stage:run_data_stage",
        description="offline code corpus, code-search pairs and HumanEval",
        key_metrics=("total.files", "total.bytes", "total.tokens", "total.pairs"),
        config="modelkiln.data.config:DataConfig",
    ),
    StageSpec(
        "tokenizer",
        "modelkiln.data.tokenizer:run_tokenizer_stage",
        requires=("data",),
        description="byte-level BPE tokenizer with FIM tokens",
        key_metrics=("vocab_size", "validation_bytes_per_token", "roundtrip_failures"),
        config="modelkiln.data.config:TokenizerConfig",
    ),
    StageSpec(
        "train",
        "modelkiln.train.stage:run_train_stage",
        requires=("data", "tokenizer"),
        description="pretrain a small code LM, then (PEFT) fine-tune it on held-out domain modules",
        key_metrics=(
            "pretrain.perplexity_after",
            "finetune.perplexity_before",
            "finetune.perplexity_after",
            "finetune.tokens_per_s",
        ),
        config="modelkiln.train.config:TrainConfig",
    ),
    StageSpec(
        "optimize",
        "modelkiln.pipeline_monitor:run_optimize_stage",  # optimize, then its reference profile
        version=2,  # 2: the promoted model carries its monitor_profile
        requires=("data", "train"),
        description="quantize / prune / distill / export the trained model behind quality gates",
        key_metrics=("chosen", "chosen_speedup", "chosen_quality_ratio", "baseline_quality"),
        config="modelkiln.optimize.config:OptimizeConfig",
    ),
    StageSpec(
        "serve",
        "modelkiln.pipeline_serve:run_serve_stage",
        requires=("train",),
        optional=("optimize",),
        description="serve the model over HTTP, load-test it, drain and stop",
        key_metrics=(
            "closed.output_tokens_per_s",
            "closed.ttft_p50_ms",
            "closed.tpot_p50_ms",
            "errors",
        ),
        config="modelkiln.serve.stage:ServeStageConfig",
    ),
    StageSpec(
        "monitor",
        "modelkiln.pipeline_monitor:run_monitor_stage",
        requires=("data", "train"),
        optional=("optimize",),
        description="profile the served model, replay held-out then prose traffic: drift + alert",
        key_metrics=("held_out.drift_detected", "prose.drift_detected", "alerts_received"),
        config="modelkiln.monitor.stage:MonitorStageConfig",
    ),
):
    register_stage(_spec)
