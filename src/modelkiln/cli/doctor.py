"""``kiln doctor``: environment checks and the measured hardware baseline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelkiln.cli._common import console, guard


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a throughput PNG here.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Skip the throughput and smoke tests.")
    ] = False,
    size: Annotated[int, typer.Option("--size", min=64, help="Matmul size for throughput.")] = 2048,
) -> None:
    """Check this environment and measure its hardware baseline; exit 1 if it cannot run.

    Example: kiln doctor --plot doctor.png
    """
    from modelkiln.doctor import plot_doctor, run_doctor

    with guard():
        if not as_json:
            console.print("[dim]checking the environment and measuring matmul throughput ...[/dim]")
        report = run_doctor(measure=not quick, matmul_size=size)
        if plot is not None:
            plot_doctor(report, plot)
    if as_json:
        sys.stdout.write(json.dumps(json.loads(report.model_dump_json()), indent=2) + "\n")
    else:
        _doctor_table(report)
        if plot is not None:
            console.print(f"plot: {plot}")
    if not report.ok:
        raise typer.Exit(1)


def _doctor_table(report: object) -> None:
    from modelkiln.doctor import DoctorReport

    assert isinstance(report, DoctorReport)
    colours = {"pass": "green", "warn": "yellow", "fail": "red", "": "white"}
    table = Table(title="kiln doctor", title_justify="left")
    for col in ("section", "item", "value", "status"):
        table.add_column(col, overflow="fold")
    for section, item, value, status in report.rows():
        c = colours.get(status, "white")
        table.add_row(
            escape(section), escape(item), escape(value), f"[{c}]{status}[/{c}]" if status else ""
        )
    console.print(table)
    console.print(report.summary_line(), markup=False)


def register(app: typer.Typer) -> None:
    """Add ``doctor`` to the root app."""
    app.command()(doctor)
