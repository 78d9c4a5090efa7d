"""The ``train`` pipeline stage: pretrain and/or fine-tune, write model, adapter and report.

Reads ``ctx.inputs["tokenizer"]`` and ``ctx.inputs["data"]``. Checkpoints go to
``<run_dir>/checkpoints/train/`` (outside the atomic stage directory, so a
killed run resumes from them when the stage is re-run) and are deleted after
success unless ``train.keep_checkpoints``. The artifact layout is described in
:mod:`modelkiln.train.outputs`.

Example:
    >>> cfg = PipelineConfig(run="demo", stages=["data", "tokenizer", "train"])
    >>> run_pipeline(cfg).outcome("train").artifact.metrics["finetune"]["perplexity_after"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.errors import StageError
from modelkiln.progress import QUIET, Progress
from modelkiln.train.config import TrainConfig
from modelkiln.train.phases import FitResult, fit
from modelkiln.train.report import LOSS_PLOT, plot_loss, render_report

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from modelkiln.stages import StageContext

STAGE = "train"
MONITOR_DIR = "monitor"


def checkpoint_root(run_dir: Path) -> Path:
    """Where the train stage of a run keeps its checkpoints."""
    return run_dir / "checkpoints" / STAGE


def train_into(
    cfg: TrainConfig,
    out: Path,
    *,
    data: str | Path,
    tokenizer: str | Path | None,
    run_dir: Path,
    seed: int,
    resume: bool | None = None,
    progress: Progress = QUIET,
    callbacks: Sequence[TrainerCallback] = (),
) -> FitResult:
    """Run :func:`~modelkiln.train.phases.fit` into ``out`` and add the report and plots.

    With ``cfg.monitor.enabled`` a :class:`~modelkiln.train.monitor.TrainingMonitor` follows
    every phase into ``out/monitor/`` and the report gets its section.

    Raises:
        ConfigError: ``cfg.report_to`` names an unknown or uninstalled integration.
    """
    from modelkiln.train.monitor import TrainingMonitor, check_report_to, render_monitor_section

    check_report_to(cfg.report_to)
    monitor = None
    if cfg.monitor.enabled:
        monitor = TrainingMonitor(out / MONITOR_DIR, cfg.monitor, block_size=cfg.data.block_size)
    try:
        result = fit(
            cfg,
            data=data,
            tokenizer=tokenizer,
            out=out,
            ckpt_root=checkpoint_root(run_dir),
            seed=seed,
            final_dir=run_dir / STAGE,
            resume=resume,
            progress=progress,
            callbacks=[*callbacks, *([monitor] if monitor else [])],
        )
    finally:
        if monitor is not None:
            monitor.close()
    plot_loss(result.phases, out / LOSS_PLOT)
    report = render_report(result)
    if monitor is not None and monitor.path.is_file():
        report += "\n" + render_monitor_section(monitor.path, monitor.plots)
    (out / "report.md").write_text(report, encoding="utf-8")
    return result


def run_train_stage(ctx: StageContext) -> None:
    """Pipeline entry point: train into ``ctx.out`` and record metrics.

    Raises:
        StageError: the data or tokenizer artifact is missing.
        ConfigError: a bad model source, target module or sequence length.
    """
    cfg = ctx.config
    assert isinstance(cfg, TrainConfig)
    for need in ("data", "tokenizer"):
        if need not in ctx.inputs:
            raise StageError(
                f"the train stage needs the {need!r} artifact",
                hint=f"add '{need}' before 'train' in stages",
            )
    seed = cfg.seed if cfg.seed is not None else ctx.pipeline.seed
    result = train_into(
        cfg,
        ctx.out,
        data=ctx.inputs["data"].path,
        tokenizer=ctx.inputs["tokenizer"].path,
        run_dir=ctx.pipeline.run_dir,
        seed=seed,
        progress=ctx.progress,
    )
    ctx.metrics.update(result.metrics())
