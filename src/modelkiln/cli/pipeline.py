"""``kiln pipeline run`` and ``kiln quickstart``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelkiln.cli._common import (
    ConfigOpt,
    ForceOpt,
    RunOpt,
    RunsDirOpt,
    SetOpt,
    _load,
    _quickstart_config,
    _run,
    guard,
)

pipeline_app = typer.Typer(help="Run pipelines from YAML configs.", no_args_is_help=True)


@pipeline_app.command("run")
def pipeline_run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    stages: Annotated[
        str | None, typer.Option("--stages", help="Comma-separated subset, e.g. data,tokenizer.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Run a pipeline config stage by stage; finished stages are skipped.

    Example: kiln pipeline run configs/quickstart.yaml --set data.max_files=200
    """
    with guard():
        cfg = _load(config, set_, run, runs_dir, stages.split(",") if stages else None)
    _run(cfg, force)


def quickstart(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    runs_dir: RunsDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run the quickstart pipeline end to end (what `make demo` runs).

    Example: kiln quickstart
    """
    with guard():
        cfg = _load(config or _quickstart_config(), set_, None, runs_dir)
    _run(cfg, force)


def register(app: typer.Typer) -> None:
    """Add ``pipeline`` and ``quickstart`` to the root app."""
    app.add_typer(pipeline_app, name="pipeline")
    app.command()(quickstart)
