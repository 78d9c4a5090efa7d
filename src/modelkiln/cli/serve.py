"""``kiln serve``: the OpenAI-compatible server.

The flags, the server extensions and the mapping of errors to exit codes are
defined once, in :func:`modelkiln.serve.__main__.main` (also
``python -m modelkiln.serve``); this command passes its arguments through.
"""

from __future__ import annotations

import typer

from modelkiln.cli._common import _state

# kiln serve passes every argument through to the server's own parser, which owns --help.
_SERVE_SETTINGS: dict = {
    "context_settings": {
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    "add_help_option": False,
}


def serve(ctx: typer.Context) -> None:
    """Serve models over an OpenAI-compatible HTTP API (kiln serve --help lists the flags).

    Example: kiln serve --model-path runs/quickstart/train/model --port 8000
    """
    from modelkiln.serve.__main__ import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args), prog="kiln serve", debug=_state["debug"]))


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the root app."""
    app.command(**_SERVE_SETTINGS)(serve)
