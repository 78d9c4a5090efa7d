"""``kiln audit``: check a tamper-evident audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from modelkiln.cli._common import console, guard

audit_app = typer.Typer(
    name="audit",
    help="Tamper-evident audit logs (kiln serve --audit-log FILE).\n\n"
    "Example: kiln audit verify audit.jsonl",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@audit_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="The JSONL audit log.", exists=True)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the hash chain; exit 1 and name the line of every edit, deletion, insertion or
    reordering.

    Example: kiln audit verify /var/log/kiln/audit.jsonl
    """
    from modelkiln.contract.audit import verify_audit_log

    with guard():
        report = verify_audit_log(file)
    if as_json:
        out = {
            "ok": report.ok,
            "lines": report.lines,
            "checkpoints": report.checkpoints,
            "problems": report.problems,
        }
        sys.stdout.write(json.dumps(out) + "\n")
    elif report.ok:
        console.print(
            f"[green]ok[/green]: {report.lines} lines, {report.checkpoints} checkpoints,"
            " chain intact"
        )
    else:
        console.print(f"[red]TAMPERED[/red]: {file}")
        for problem in report.problems:
            console.print(f"  {escape(problem)}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to the root app."""
    app.add_typer(audit_app, name="audit")
