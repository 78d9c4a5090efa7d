"""The pipeline engine: runs registered stages in order, with caching, resume and a report.

Stages are registered in :mod:`modelkiln.stages` (lazy ``"module:function"``
entries, so nothing heavy is imported until a stage runs); a stage function
gets a :class:`~modelkiln.stages.StageContext`. This module and the CLI are the
only places that wire stages together: a stage never calls the engine.

A stage is skipped when its directory holds a verified manifest whose cache
key (stage config + seed + input artifacts + code and Python version) equals
the one it would run with; that is how ``kiln pipeline run`` resumes after a
crash. The run report is written by the ``report`` callable passed in
(default :func:`modelkiln.report.write_run_report`; ``None`` writes none).

Example:
    >>> result = run_pipeline(load_config("configs/quickstart.yaml"))
    >>> [(o.stage, o.status) for o in result.outcomes]
    [('data', 'ran'), ('tokenizer', 'ran'), ('train', 'ran'), ...]
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from modelkiln import __version__
from modelkiln.artifacts import (
    Artifact,
    clean_stale,
    hash_json,
    load_artifact,
    stage_writer,
)
from modelkiln.configbase import KilnModel
from modelkiln.errors import ArtifactError, KilnError, StageError
from modelkiln.logs import LOG_FILE, capture_output
from modelkiln.progress import QUIET, Progress
from modelkiln.report import write_run_report
from modelkiln.stages import STAGES, StageContext, StageSpec

if TYPE_CHECKING:
    from modelkiln.config import PipelineConfig

__all__ = [
    "STAGES",
    "PipelineResult",
    "ReportWriter",
    "StageContext",
    "StageOutcome",
    "StageSpec",
    "build_stage",
    "cache_key",
    "cached_artifact",
    "resolve_inputs",
    "run_pipeline",
    "run_stage",
    "stage_config",
]

Status = Literal["ran", "cached", "failed"]


@dataclass
class StageOutcome:
    """What happened to one stage in a run."""

    stage: str
    status: Status
    seconds: float = 0.0
    message: str = ""
    artifact: Artifact | None = None
    key_metrics: tuple[str, ...] = ()
    """The stage's declared key metrics (the run report shows them)."""


@dataclass
class PipelineResult:
    """The outcome of every stage, plus where the run report was written."""

    run_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    report: Path | None = None

    def outcome(self, stage: str) -> StageOutcome:
        """The outcome of ``stage``."""
        return next(o for o in self.outcomes if o.stage == stage)


ReportWriter = Callable[["PipelineConfig", "PipelineResult"], Path]
"""Writes the run report of a finished (or failed) run and returns its path."""


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


def cached_artifact(cfg: PipelineConfig, name: str, inputs: dict[str, Artifact]) -> Artifact | None:
    """The stage's finished artifact when its cache key matches this config and these inputs."""
    try:
        artifact = load_artifact(cfg.run_dir / name)
    except ArtifactError:
        return None
    return artifact if artifact.manifest.cache_key == cache_key(cfg, STAGES[name], inputs) else None


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
    if not force and (hit := cached_artifact(cfg, name, inputs)) is not None:
        return StageOutcome(
            name,
            "cached",
            time.perf_counter() - start,
            "inputs and config unchanged",
            hit,
            spec.key_metrics,
        )
    fn = spec.load()
    section = stage_config(cfg, name)
    with stage_writer(
        cfg.run_dir, name, config=section.model_dump(mode="json"), cache_key=key, inputs=inputs
    ) as pending:
        ctx = StageContext(cfg, section, pending.path, inputs, pending.metrics, progress)
        # Third-party warnings and bars go to the stage's log.txt (kept beside it on failure).
        log_file, kept = pending.path / LOG_FILE, cfg.run_dir / f"{name}.{LOG_FILE}"
        with capture_output(log_file, notice=progress.message, keep_on_error=kept):
            fn(ctx)
    artifact = load_artifact(stage_dir)
    return StageOutcome(name, "ran", time.perf_counter() - start, "", artifact, spec.key_metrics)


def resolve_inputs(
    cfg: PipelineConfig, spec: StageSpec, done: dict[str, StageOutcome] | None = None
) -> dict[str, Artifact]:
    """The input artifacts of ``spec``: from this run's finished stages, else the run directory.

    Raises:
        StageError: a required input artifact is missing.
    """
    done = done or {}
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
    report: ReportWriter | None = write_run_report,
) -> PipelineResult:
    """Run the configured stages in order, skipping cached ones.

    Args:
        cfg: the validated pipeline config.
        force: re-run stages even when their cache key matches.
        progress: progress sink (the CLI passes a rich one).
        report: writes the run report (``report.md`` with plots); None: no report.

    Raises:
        StageError: a stage failed or lacks an input artifact (the report is
            still written, marking the failed stage).
    """
    result = PipelineResult(run_dir=cfg.run_dir)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(cfg.run_dir)
    done: dict[str, StageOutcome] = {}
    try:
        for name in cfg.stages:
            spec = STAGES[name]
            progress.message(f"stage {name}: {spec.description}")
            try:
                outcome = run_stage(
                    cfg, name, resolve_inputs(cfg, spec, done), force=force, progress=progress
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
        if report is not None:
            result.report = report(cfg, result)
    return result


def build_stage(cfg: PipelineConfig, stage: str, *, progress: Progress = QUIET) -> Artifact:
    """Run (or reuse) just ``stage`` of ``cfg``'s run, without a run report; its artifact.

    For jobs outside the pipeline that need one stage's output (``kiln train encoder``
    needs the data stage's code-search pairs).

    Raises:
        StageError: the stage failed or lacks an input artifact.
    """
    result = run_pipeline(
        cfg.model_copy(update={"stages": [stage]}), progress=progress, report=None
    )
    artifact = result.outcome(stage).artifact
    if artifact is None:  # run_pipeline raises when the stage fails; kept for type checkers
        raise StageError(f"stage {stage!r} left no artifact", hint="re-run it with --force")
    return artifact
