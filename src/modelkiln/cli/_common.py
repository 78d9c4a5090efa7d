"""Shared pieces of the ``kiln`` command modules: consoles, the error guard, progress bars,
common options and the pipeline runner helpers. Library code never imports this."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelkiln import __version__
from modelkiln.errors import KilnError
from modelkiln.progress import Progress

if TYPE_CHECKING:
    from rich.progress import TaskID

    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import PipelineResult

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

QUICKSTART = Path("configs/quickstart.yaml")


class RichProgress(Progress):
    """Draws library progress as rich progress bars."""

    def __init__(self, con: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars

        self.console = con
        self.bars = Bars(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=con,
            transient=True,
            # Third-party stderr goes to the run's log files (modelkiln.logs), not above the bars.
            redirect_stderr=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def start(self, task: str, total: float | None = None) -> None:
        if not self.tasks:
            self.bars.start()
        self.tasks[task] = self.bars.add_task(task, total=total)

    def advance(self, task: str, amount: float = 1.0) -> None:
        if task in self.tasks:
            self.bars.advance(self.tasks[task], amount)

    def finish(self, task: str) -> None:
        if task in self.tasks:
            self.bars.remove_task(self.tasks.pop(task))
        if not self.tasks:
            self.bars.stop()

    def message(self, text: str) -> None:
        self.console.print(f"[dim]·[/dim] {text}", highlight=False)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn library errors into one red line and exit code 2 (traceback with --debug)."""
    try:
        yield
    except KilnError as exc:
        if _state["debug"]:
            raise
        # escape(): messages hold brackets (pip install 'modelkiln[distributed]').
        err_console.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted[/yellow] — finished stages are kept; re-run to resume"
        )
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"modelkiln {__version__}")
        raise typer.Exit()


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Pipeline YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config value: --set data.max_files=50 (repeatable)."
    ),
]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run name (default: from the config).")]
RunsDirOpt = Annotated[
    Path | None, typer.Option("--runs-dir", help="Where runs live (default: runs).")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Re-run stages even when cached.")]


def _load(
    config: Path | None,
    sets: list[str] | None,
    run: str | None,
    runs_dir: Path | None,
    stages: list[str] | None = None,
) -> PipelineConfig:
    from modelkiln.config import load_config

    # Named flags win over YAML and --set (STYLE rule 7).
    return load_config(config, sets, {"run": run, "runs_dir": runs_dir, "stages": stages})


def _summary(result: PipelineResult) -> None:
    from modelkiln.report import key_figures, stage_seconds

    colours = {"ran": "green", "cached": "cyan", "failed": "red"}
    table = Table(title=f"run {result.run_dir}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("key figures / note", overflow="fold")
    for o in result.outcomes:
        c = colours[o.status]
        table.add_row(
            o.stage, f"[{c}]{o.status}[/{c}]", f"{stage_seconds(o):.1f}", escape(key_figures(o))
        )
    console.print(table)
    if result.report:
        console.print(f"report: {result.report}")


def _run(cfg: PipelineConfig, force: bool) -> None:
    from modelkiln.logs import LOG_FILE, capture_output, set_verbose
    from modelkiln.pipeline import run_pipeline

    set_verbose(_state["debug"])  # --debug also shows third-party output
    progress = RichProgress(console)
    with guard(), capture_output(cfg.run_dir / LOG_FILE, notice=progress.message) as log:
        result = run_pipeline(cfg, force=force, progress=progress)
    _summary(result)
    console.print(f"[dim]library warnings and logs: {log} and <stage>/{LOG_FILE}[/dim]")


def _quickstart_config() -> Path:
    if QUICKSTART.is_file():
        return QUICKSTART
    from importlib import resources

    return Path(str(resources.files("modelkiln") / "recipes" / "quickstart.yaml"))
