"""The run report: one markdown page with plots for a whole pipeline run.

``runs/<run>/report.md`` holds a table of every stage (status, time, key
figures), a bar chart of stage times, and each stage's own ``report.md``
section (with its image links rewritten to point into the stage directory).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln import __version__
from modelkiln.artifacts import write_text_atomic

if TYPE_CHECKING:
    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import PipelineResult, StageOutcome

_IMAGE = re.compile(r"!\[([^\]]*)\]\((?!https?://|/)([^)]+)\)")


def stage_seconds(outcome: StageOutcome) -> float:
    """Compute time a stage took when it last ran (from its manifest, so cached stages count)."""
    if outcome.artifact is None:
        return outcome.seconds
    m = outcome.artifact.manifest
    return (datetime.fromisoformat(m.finished) - datetime.fromisoformat(m.started)).total_seconds()


def _lookup(metrics: dict[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def key_figures(outcome: StageOutcome, limit: int = 4) -> str:
    """The stage's declared key metrics (else its first scalars), as ``name=value`` text."""
    if outcome.artifact is None:
        return outcome.message
    metrics = outcome.artifact.metrics
    names = list(outcome.key_metrics) or list(metrics)
    shown = []
    for name in names:
        v = _lookup(metrics, name)
        if isinstance(v, int | float | str) and not isinstance(v, bool):
            shown.append(f"{name}={v:.4g}" if isinstance(v, float) else f"{name}={v}")
    return ", ".join(shown[:limit])


def _plot_stage_times(result: PipelineResult, path: Path) -> Path | None:
    timed = [(o.stage, stage_seconds(o)) for o in result.outcomes if o.artifact is not None]
    if not timed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(timed)))
    ax.barh([s for s, _ in timed], [t for _, t in timed], color="#c0504d")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (when the stage last ran)")
    ax.set_title("Stage compute time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stage_section(outcome: StageOutcome) -> str:
    if outcome.artifact is None:
        return ""
    md = outcome.artifact.path / "report.md"
    if not md.is_file():
        return ""
    text = md.read_text(encoding="utf-8").strip()
    return _IMAGE.sub(lambda m: f"![{m.group(1)}]({outcome.stage}/{m.group(2)})", text)


def render_run_report(cfg: PipelineConfig, result: PipelineResult, plot: str | None) -> str:
    """The markdown text of the run report."""
    lines = [
        f"# modelkiln run `{cfg.run}`",
        "",
        f"modelkiln {__version__}, written {datetime.now(UTC).isoformat(timespec='seconds')}, "
        f"seed {cfg.seed}.",
        "",
        "| stage | status | seconds | key figures / note |",
        "|---|---|---:|---|",
    ]
    for o in result.outcomes:
        lines.append(f"| {o.stage} | {o.status} | {stage_seconds(o):.1f} | {key_figures(o)} |")
    if plot:
        lines += ["", f"![stage compute time]({plot})"]
    for o in result.outcomes:
        if section := _stage_section(o):
            lines += ["", section]
    return "\n".join(lines) + "\n"


def write_run_report(cfg: PipelineConfig, result: PipelineResult) -> Path:
    """Write ``report.md`` (and ``stage_times.png``) into the run directory and return its path."""
    run_dir = cfg.run_dir
    plot = _plot_stage_times(result, run_dir / "stage_times.png")
    path = run_dir / "report.md"
    write_text_atomic(path, render_run_report(cfg, result, plot.name if plot else None))
    return path
