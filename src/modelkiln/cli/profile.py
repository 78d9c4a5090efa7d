"""``kiln profile``: where a model's time and memory go, or a running server's CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelkiln.cli._common import console, guard


def profile(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model dir or any kiln optimize variant dir (HF fp32/bf16, torchao int8, "
            "pruned, distilled, TorchScript, torch.export, ONNX)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("profile"),
    batch: Annotated[int, typer.Option(min=1, help="Batch size profiled.")] = 4,
    seq: Annotated[int, typer.Option(min=1, help="Sequence length profiled.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Profiled forward passes.")] = 3,
    top: Annotated[int, typer.Option(min=1, help="Rows of the top-ops table.")] = 15,
    backend: Annotated[
        str | None, typer.Option(help="torch / onnx (default: torch when it has weights).")
    ] = None,
    memory: Annotated[
        bool, typer.Option(help="Training-memory analysis (torch; runs one Adam step).")
    ] = True,
    server: Annotated[
        str | None, typer.Option(help="Sample a running server process (py-spy) instead.")
    ] = None,
    pid: Annotated[
        int | None, typer.Option(help="Sample this process id (py-spy; alone or with --server).")
    ] = None,
    seconds: Annotated[float, typer.Option(help="With --server / --pid: seconds sampled.")] = 10.0,
    idle: Annotated[
        bool,
        typer.Option(
            "--idle", help="With --server / --pid: also sample waiting threads (an idle server)."
        ),
    ] = False,
) -> None:
    """Profile a model (torch.profiler / ONNX Runtime trace, top ops, memory) or a server.

    Writes trace.json (open it in https://ui.perfetto.dev) and profile.json (top ops, memory).
    With --server URL (or --pid PID): a py-spy flame graph SVG of the running server and its
    Python worker processes; a PID that is a wrapper (sh -c ...) is sampled through its Python
    children. Profile under load: py-spy leaves out waiting threads, so an idle server has
    nothing to show unless --idle is given.

    Example: kiln profile runs/quickstart/train/model --batch 8 --seq 128 -o prof/
    """
    from modelkiln.bench.profiling import profile_model, profile_server
    from modelkiln.cli._common import _state
    from modelkiln.logs import LOG_FILE, capture_output, set_verbose

    set_verbose(_state["debug"])  # --debug also shows third-party output
    with guard(), capture_output(out / LOG_FILE):
        if server is not None or pid is not None:
            svg = profile_server(server, out, seconds=seconds, pid=pid, idle=idle)
            info = json.loads((svg.parent / "flame.json").read_text())
            console.print(
                f"sampled process {info['pid']} {info['process']} "
                f"(Python pids {info['python_pids']}, {info['samples']} samples)"
            )
            console.print(f"flame graph: {svg}")
            return
        if model is None:
            from modelkiln.errors import ConfigError

            raise ConfigError(
                "give MODEL, --server URL or --pid PID", hint="e.g. kiln profile MODEL_DIR"
            )
        result = profile_model(
            model, out, batch=batch, seq=seq, steps=steps, top=top, backend=backend, memory=memory
        )
    table = Table(title=f"top ops by self time ({result['backend']})", title_justify="left")
    for col in ("op", "calls", "self ms", "%"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for row in result["top_ops"]:
        table.add_row(row["name"][:60], str(row["calls"]), f"{row['self_ms']:.3f}",
                      f"{row['self_pct']:.1f}")  # fmt: skip
    console.print(table)
    v = result["variant"]
    console.print(
        f"[dim]variant {v['variant'] or '-'}, format {v['format']}, dtype {v['dtype'] or '-'}, "
        f"device {v['device']}[/dim]"
    )
    mem = result.get("memory") or {}
    if mem.get("skipped"):
        console.print(f"memory analysis skipped: {mem['skipped']}")
    for key, value in mem.items():
        if isinstance(value, int | float):
            console.print(f"{key}: {value:,.3f}")
    if mem.get("measured_how"):
        console.print(
            f"(measured: {mem['measured_how']}; estimate = grads + Adam 2x + activations)"
        )
    console.print(f"trace: {result['trace']}  (open in https://ui.perfetto.dev)")
    console.print(f"[dim]library warnings and logs: {out / LOG_FILE}[/dim]")


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command."""
    app.command("profile")(profile)


__all__ = ["profile", "register"]
