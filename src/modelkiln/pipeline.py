"""The pipeline engine: stage registry, caching, resume and the run report.

A stage is a function ``run(ctx: StageContext) -> None`` that writes its
outputs into ``ctx.out`` and its numbers into ``ctx.metrics``. It may write a
``report.md`` (and PNG plots next to it) that the run report includes. Stages
register by name in :data:`STAGES` with a ``"module:function"`` entry point so
nothing heavy is imported until a stage runs.

A stage is skipped when its directory holds a verified manifest whose cache
key (stage config + seed + input artifacts + code and Python version) equals
the one it would run with; that is how ``kiln pipeline run`` resumes after a
crash. Stages named in the config that are not built yet are reported as
``unavailable``; stages depending on them as ``blocked``. Nothing is faked.

Example:
    >>> result = run_pipeline(load_config("configs/quickstart.yaml"))
    >>> [(o.stage, o.status) for o in result.outcomes]
    [('data', 'ran'), ('tokenizer', 'ran'), ('train', 'unavailable'), ...]
"""

from __future__ import annotations

import contextlib
import importlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelkiln import __version__
from modelkiln.artifacts import (
    Artifact,
    clean_stale,
    hash_json,
    load_artifact,
    stage_writer,
)
from modelkiln.config import KilnModel, PipelineConfig
from modelkiln.errors import ArtifactError, KilnError, StageError
from modelkiln.progress import QUIET, Progress

Status = Literal["ran", "cached", "unavailable", "blocked", "failed"]


@dataclass
class StageContext:
    """Everything a stage function gets.

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

    def load(self) -> Callable[[StageContext], None]:
        """Import and return the stage function."""
        module, _, func = self.entry.partition(":")
        fn: Callable[[StageContext], None] = getattr(importlib.import_module(module), func)
        return fn


STAGES: dict[str, StageSpec] = {
    "data": StageSpec(
        "data",
        "modelkiln.data.stage:run_data_stage",
        description="offline code corpus, code-search pairs and HumanEval",
        key_metrics=("total.files", "total.bytes", "total.tokens", "total.pairs"),
    ),
    "tokenizer": StageSpec(
        "tokenizer",
        "modelkiln.data.tokenizer:run_tokenizer_stage",
        requires=("data",),
        description="byte-level BPE tokenizer with FIM tokens",
        key_metrics=("vocab_size", "validation_bytes_per_token", "roundtrip_failures"),
    ),
    "train": StageSpec(
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
    ),
    "optimize": StageSpec(
        "optimize",
        "modelkiln.optimize.stage:run_optimize_stage",
        requires=("data", "train"),
        description="quantize / prune / distill / export the trained model behind quality gates",
        key_metrics=("chosen", "chosen_speedup", "chosen_quality_ratio", "baseline_quality"),
    ),
    "serve": StageSpec(
        "serve",
        "modelkiln.serve.stage:run_serve_stage",
        requires=("train",),
        optional=("optimize",),
        description="serve the model over HTTP, load-test it, drain and stop",
        key_metrics=(
            "closed.output_tokens_per_s",
            "closed.ttft_p50_ms",
            "closed.tpot_p50_ms",
            "errors",
        ),
    ),
}

#: Stages the pipeline knows about but this version does not ship yet.
PLANNED: dict[str, str] = {}


@dataclass
class StageOutcome:
    """What happened to one stage in a run."""

    stage: str
    status: Status
    seconds: float = 0.0
    message: str = ""
    artifact: Artifact | None = None


@dataclass
class PipelineResult:
    """The outcome of every stage, plus where the run report was written."""

    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    report: Path | None = None

    def outcome(self, stage: str) -> StageOutcome:
        """The outcome of ``stage``."""
        return next(o for o in self.outcomes if o.stage == stage)


def stage_config(cfg: PipelineConfig, stage: str) -> KilnModel:
    """The config section of ``stage``."""
    section = getattr(cfg, stage, None)
    if not isinstance(section, KilnModel):
        raise StageError(f"stage {stage!r} has no config section", hint="check the stage name")
    return section


def cache_key(cfg: PipelineConfig, spec: StageSpec, inputs: dict[str, Artifact]) -> str:
    """Hash of everything that decides a stage's output."""
    return hash_json(
        {
            "stage": spec.name,
            "stage_version": spec.version,
            "modelkiln": __version__,
            "python": platform.python_version(),
            "seed": cfg.seed,
            "config": stage_config(cfg, spec.name).model_dump(mode="json"),
            "inputs": {
                k: a.manifest.cache_key + hash_json(a.manifest.outputs) for k, a in inputs.items()
            },
        }
    )


def _cached(stage_dir: Path, key: str) -> Artifact | None:
    try:
        artifact = load_artifact(stage_dir)
    except ArtifactError:
        return None
    return artifact if artifact.manifest.cache_key == key else None


def run_stage(
    cfg: PipelineConfig,
    name: str,
    inputs: dict[str, Artifact],
    *,
    force: bool = False,
    progress: Progress = QUIET,
) -> StageOutcome:
    """Run one registered stage, or reuse its artifact when the cache key matches."""
    spec = STAGES[name]
    key = cache_key(cfg, spec, inputs)
    stage_dir = cfg.run_dir / name
    start = time.perf_counter()
    if not force and (hit := _cached(stage_dir, key)) is not None:
        return StageOutcome(
            name, "cached", time.perf_counter() - start, "inputs and config unchanged", hit
        )
    fn = spec.load()
    section = stage_config(cfg, name)
    with stage_writer(
        cfg.run_dir, name, config=section.model_dump(mode="json"), cache_key=key, inputs=inputs
    ) as pending:
        ctx = StageContext(cfg, section, pending.path, inputs, pending.metrics, progress)
        fn(ctx)
    artifact = load_artifact(stage_dir)
    return StageOutcome(name, "ran", time.perf_counter() - start, "", artifact)


def _resolve_inputs(
    cfg: PipelineConfig, spec: StageSpec, done: dict[str, StageOutcome]
) -> dict[str, Artifact]:
    inputs: dict[str, Artifact] = {}
    for req in spec.requires:
        outcome = done.get(req)
        if outcome is not None and outcome.artifact is not None:
            inputs[req] = outcome.artifact
            continue
        try:
            inputs[req] = load_artifact(cfg.run_dir / req)
        except ArtifactError:
            raise StageError(
                f"stage {spec.name!r} needs the {req!r} artifact, "
                f"which run {cfg.run!r} does not have",
                hint=f"add '{req}' to 'stages' (it runs before '{spec.name}')",
            ) from None
    for opt in spec.optional:
        outcome = done.get(opt)
        if outcome is not None and outcome.artifact is not None:
            inputs[opt] = outcome.artifact
        elif opt not in cfg.stages:  # not part of this run: an earlier run's artifact, if any
            with contextlib.suppress(ArtifactError):
                inputs[opt] = load_artifact(cfg.run_dir / opt)
    return inputs


def run_pipeline(
    cfg: PipelineConfig,
    *,
    force: bool = False,
    progress: Progress = QUIET,
    write_report: bool = True,
) -> PipelineResult:
    """Run the configured stages in order, skipping cached ones.

    Args:
        cfg: the validated pipeline config.
        force: re-run stages even when their cache key matches.
        progress: progress sink (the CLI passes a rich one).
        write_report: write ``report.md`` with plots into the run directory.

    Raises:
        StageError: a stage failed or lacks an input artifact (the report is
            still written, marking the failed stage).
    """
    result = PipelineResult(run_dir=cfg.run_dir)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(cfg.run_dir)
    done: dict[str, StageOutcome] = {}
    unavailable: set[str] = set()
    try:
        for name in cfg.stages:
            spec = STAGES.get(name)
            if spec is None:
                unavailable.add(name)
                outcome = StageOutcome(
                    name,
                    "unavailable",
                    message=f"not built yet in modelkiln {__version__} "
                    f"({PLANNED.get(name, 'no stage registered')})",
                )
            elif blockers := [r for r in spec.requires if r in unavailable]:
                unavailable.add(name)
                outcome = StageOutcome(name, "blocked", message=f"needs {', '.join(blockers)}")
            else:
                progress.message(f"stage {name}: {spec.description}")
                try:
                    outcome = run_stage(
                        cfg, name, _resolve_inputs(cfg, spec, done), force=force, progress=progress
                    )
                except KilnError as exc:
                    result.outcomes.append(StageOutcome(name, "failed", message=str(exc)))
                    raise
                except Exception as exc:
                    result.outcomes.append(StageOutcome(name, "failed", message=repr(exc)))
                    raise StageError(
                        f"stage {name!r} failed: {exc.__class__.__name__}: {exc}",
                        hint="re-run with --debug for the traceback",
                    ) from exc
            done[name] = outcome
            result.outcomes.append(outcome)
            progress.message(f"stage {name}: {outcome.status} {outcome.message}".rstrip())
    finally:
        if write_report:
            from modelkiln.report import write_run_report

            result.report = write_run_report(cfg, result)
    return result
