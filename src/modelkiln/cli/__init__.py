"""The ``kiln`` command line: thin typer commands that parse, call the library, render.

One module per command group; each has ``register(app)``. No logic lives here.
Heavy modules (torch, transformers) are imported inside the commands that need
them, so ``kiln --help`` stays fast and torch-free.

To add a command group: write ``cli/<group>.py`` with a ``register(app)`` and add
its name to ``GROUPS`` (the order is the order of ``kiln --help``).
"""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

from modelkiln.cli._common import _state, _version

GROUPS: tuple[str, ...] = (
    "pipeline",
    "data",
    "train",
    "optimize",
    "serve",
    "doctor",
    "monitor",
    "registry",
    "rollout",
    "bench",
    "profile",
    "deploy",
    "keys",
    "audit",
    "sign",
)


def _stages_epilog() -> str:
    from modelkiln.stages import STAGES

    rows = [f"  {n:<10} {s.description}" for n, s in STAGES.items()]
    # "\b" stops click from re-wrapping the paragraph.
    return "Pipeline stages (kiln pipeline run CONFIG runs them in order):\n\n\b\n" + "\n".join(
        rows
    )


app = typer.Typer(
    name="kiln",
    help="modelkiln: fine-tune, compress, serve, benchmark and monitor transformer models.\n\n"
    "Start with: kiln doctor, then kiln quickstart.",
    epilog=_stages_epilog(),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """modelkiln: fine-tune, compress, serve, benchmark and monitor transformer models."""
    _state["debug"] = debug


for _group in GROUPS:
    importlib.import_module(f"modelkiln.cli.{_group}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["GROUPS", "app", "main"]
