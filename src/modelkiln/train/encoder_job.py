"""The ``kiln train encoder`` job: config, report and the run around the encoder library.

The library (:mod:`modelkiln.train.encoder`) fine-tunes and evaluates; this
module reads the job's YAML, takes the data artifact holding the code-search
pairs, writes ``report.md`` and ``loss_curve.png`` next to the model. Building
the data artifact is the pipeline's job, wired by the CLI.

Example:
    >>> job = load_encoder_job("configs/quickstart.yaml", ["encoder.max_steps=50"])
    >>> train_encoder(job, Path("runs/quickstart/data"))["tuned_mrr@10"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelkiln.config import DataConfig
from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError
from modelkiln.progress import QUIET, Progress
from modelkiln.train.encoder import ContrastiveConfig, train_contrastive

__all__ = [
    "ENCODER_LOSS_PLOT",
    "ENCODER_STAGE",
    "EncoderJobConfig",
    "check_pairs_enabled",
    "load_encoder_job",
    "plot_losses",
    "render_encoder_report",
    "train_encoder",
]

_PIPELINE_ONLY = {"seed", "stages", "tokenizer", "train", "optimize", "serve"}
ENCODER_STAGE = "encoder"
ENCODER_LOSS_PLOT = "loss_curve.png"


class EncoderJobConfig(KilnModel):
    """``kiln train encoder``: the pairs data to build or reuse, and the fine-tune.

    Reads a pipeline YAML (``run``, ``runs_dir``, ``data``; the other stages' sections are
    ignored) plus an ``encoder:`` section with :class:`ContrastiveConfig` fields.
    """

    run: str = Field(
        "quickstart",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: pairs come from <runs_dir>/<run>/data (built when missing).",
    )
    runs_dir: Path = Field(Path("runs"), description="Directory holding all runs.")
    data: DataConfig = Field(
        default_factory=DataConfig, description="The data stage (pairs are mined there)."
    )
    encoder: ContrastiveConfig = Field(
        default_factory=ContrastiveConfig, description="The contrastive fine-tune."
    )
    eval_split: Literal["validation", "test"] = Field(
        "validation",
        description="Pairs split to evaluate on; its top-level modules are never in 'train'.",
    )
    out: Path | None = Field(None, description="Output folder; None = <runs_dir>/<run>/encoder.")

    @property
    def out_dir(self) -> Path:
        """Where the model, adapter, metrics and report go."""
        return self.out or self.runs_dir / self.run / ENCODER_STAGE


def load_encoder_job(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    named: dict[str, Any] | None = None,
) -> EncoderJobConfig:
    """Load an :class:`EncoderJobConfig` from YAML, ``--set`` overrides and named flags.

    Raises:
        ConfigError: the file is missing or malformed, or a field is unknown or invalid.
    """
    from modelkiln.configbase import load_section

    return load_section(EncoderJobConfig, path, overrides, named=named, drop=_PIPELINE_ONLY)


def check_pairs_enabled(job: EncoderJobConfig) -> None:
    """Raise unless the job's data config extracts code-search pairs.

    Raises:
        ConfigError: pair extraction is disabled in ``data.pairs``.
    """
    if not job.data.pairs.enabled:
        raise ConfigError(
            "data.pairs.enabled is false: the encoder trains on docstring -> code pairs",
            hint="set data.pairs.enabled=true",
        )


def plot_losses(losses: list[float], path: Path) -> Path:
    """The InfoNCE loss of every training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, color="#4f81bd")
    ax.set_xlabel("step")
    ax.set_ylabel("symmetric InfoNCE loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_encoder_report(metrics: dict[str, Any], cfg: ContrastiveConfig, split: str) -> str:
    """Markdown ``## Encoder``: zero-shot vs tuned retrieval on held-out modules."""
    rows = [("MRR@10", "mrr@10"), ("recall@1", "recall@1"), ("recall@10", "recall@10")]
    lines = [
        "## Encoder",
        "",
        f"Code search: each docstring retrieves its function among {metrics['eval_pairs']} "
        f"held-out codes (the '{split}' pairs, whose top-level modules training never saw). "
        f"Model `{cfg.model}`, method {cfg.method}, {metrics['steps']} steps of "
        f"{min(cfg.batch_size, metrics['train_pairs'])} pairs ({metrics['train_pairs']} "
        f"training pairs), {metrics['train_seconds']:.0f} s, "
        f"{metrics['trainable_params']:,} / {metrics['total_params']:,} parameters trained.",
        "",
        "| metric | zero-shot | tuned | change |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        zero, tuned = metrics[f"zero_shot_{key}"], metrics[f"tuned_{key}"]
        lines.append(f"| {label} | {zero:.3f} | {tuned:.3f} | {tuned - zero:+.3f} |")
    lines += ["", f"![loss]({ENCODER_LOSS_PLOT})"]
    return "\n".join(lines) + "\n"


def train_encoder(
    job: EncoderJobConfig, data_dir: Path, progress: Progress = QUIET
) -> dict[str, Any]:
    """Fine-tune on the pairs of ``data_dir``, evaluate, write model, adapter, metrics, report.

    ``data_dir`` is the data artifact; the CLI builds (or reuses) it with the pipeline
    (:func:`modelkiln.pipeline.build_stage`) before calling this.

    Example:
        >>> job = load_encoder_job("configs/quickstart.yaml", ["encoder.max_steps=50"])
        >>> m = train_encoder(job, Path("runs/quickstart/data"))
        >>> m["zero_shot_mrr@10"], m["tuned_mrr@10"], m["report"]
    """
    from modelkiln.contract.corpus import load_pairs

    check_pairs_enabled(job)
    pairs = load_pairs(data_dir)
    out = job.out_dir
    metrics = train_contrastive(pairs["train"], pairs[job.eval_split], job.encoder, out, progress)
    plot_losses(metrics["losses"], out / ENCODER_LOSS_PLOT)
    report = out / "report.md"
    report.write_text(render_encoder_report(metrics, job.encoder, job.eval_split), "utf-8")
    return {**metrics, "report": str(report), "out_dir": str(out)}
