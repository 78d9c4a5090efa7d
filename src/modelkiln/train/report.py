"""The train stage's ``report.md`` and loss-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelkiln.train.phases import FitResult, PhaseResult

LOSS_PLOT = "loss_curve.png"


def plot_loss(phases: list[PhaseResult], path: Path) -> Path:
    """Train loss (per logged step) and eval loss of every phase, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        train = [(h["step"], h["loss"]) for h in phase.log_history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in phase.log_history if "eval_loss" in h]
        if train:
            dots = "." if len(train) < 20 else None  # a lone point needs a marker to show
            ax.plot(*zip(*train, strict=True), marker=dots, label="train loss", color="#4f81bd")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#c0504d")
        ax.set_title(f"{phase.name} ({phase.method})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_report(result: FitResult) -> str:
    """Markdown starting with ``## Train``: one row per phase, then the loss plot."""
    lines = [
        "## Train",
        "",
        f"Precision {result.precision}"
        + (f" ({result.precision_reason})" if result.precision_reason else "")
        + f", seed {result.seed}. "
        f"Output: model `{result.layout['model']}`"
        + (f", adapter `{result.layout['adapter']}`" if result.layout["adapter"] else "")
        + f"; block size {result.layout['block_size']} tokens.",
        "",
        "| phase | method | steps | trainable / total params | tokens/s | "
        "eval ppl before | eval ppl after | final train loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.phases:
        final = "—" if p.final_train_loss is None else f"{p.final_train_loss:.3f}"
        share = p.trainable_params / max(p.total_params, 1)
        note = " (reused)" if p.reused else (" (resumed)" if p.resumed_from else "")
        lines.append(
            f"| {p.name}{note} | {p.method} | {p.steps} | {p.trainable_params:,} / "
            f"{p.total_params:,} ({share:.2%}) | {p.tokens_per_s:,.0f} | "
            f"{p.perplexity_before:,.2f} | {p.perplexity_after:,.2f} | {final} |"
        )
    lines += [
        "",
        "Perplexity is exp(mean next-token loss) on the phase's held-out blocks: the general "
        "validation split for pretraining, the held-out domain files for fine-tuning. "
        "Tokens/s counts optimizer-step time only (no evaluation or checkpointing).",
        "",
        f"![loss curves]({LOSS_PLOT})",
    ]
    return "\n".join(lines) + "\n"
