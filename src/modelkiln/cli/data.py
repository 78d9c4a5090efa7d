"""``kiln data``: the offline code datasets and the tokenizer."""

from __future__ import annotations

import typer

from modelkiln.cli._common import (
    ConfigOpt,
    ForceOpt,
    RunOpt,
    RunsDirOpt,
    SetOpt,
    _load,
    _run,
    guard,
)

data_app = typer.Typer(
    help="Build the offline code datasets and the tokenizer.", no_args_is_help=True
)


@data_app.command("build")
def data_build(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Build the code corpus, code-search pairs and HumanEval into runs/<run>/data.

    Example: kiln data build --run mydata --set data.max_files=300
    """
    with guard():
        cfg = _load(config, set_, run, runs_dir, ["data"])
    _run(cfg, force)


@data_app.command("tokenizer")
def data_tokenizer(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train the byte-level BPE tokenizer (building the corpus first if needed).

    Example: kiln data tokenizer --run mydata --set tokenizer.vocab_size=16000
    """
    with guard():
        cfg = _load(config, set_, run, runs_dir, ["data", "tokenizer"])
    _run(cfg, force)


def register(app: typer.Typer) -> None:
    """Add ``data`` to the root app."""
    app.add_typer(data_app, name="data")
