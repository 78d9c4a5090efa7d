"""``kiln optimize``: quantize, prune, distill and export behind quality gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modelkiln.cli._common import (
    ConfigOpt,
    ForceOpt,
    RichProgress,
    RunOpt,
    RunsDirOpt,
    SetOpt,
    _load,
    _quickstart_config,
    _run,
    console,
    guard,
)

optimize_app = typer.Typer(
    help="Quantize, prune, distill and export a model behind quality gates; benchmark the "
    "variants on this machine and promote the fastest one that passes."
    "\n\nWith no sub-command: run the optimize stage of a pipeline (building data, tokenizer "
    "and train first if needed)."
    "\n\nExample: kiln optimize model runs/quickstart/train --data runs/quickstart/data "
    "--out optimized --set methods=[onnx-fp32,onnx-int8-dynamic]"
)


@optimize_app.callback(invoke_without_command=True)
def optimize(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run the optimize stage (data, tokenizer and train first if needed).

    Example: kiln optimize --config configs/quickstart.yaml --set optimize.target=onnx-fp32
    """
    if ctx.invoked_subcommand is not None:
        return
    stages = ["data", "tokenizer", "train", "optimize"]
    with guard():
        cfg = _load(config or _quickstart_config(), set_, run, runs_dir, stages)
    _run(cfg, force)


@optimize_app.command("model")
def optimize_model(
    source: Annotated[
        Path, typer.Argument(help="HF model directory, train artifact or PEFT adapter directory.")
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="Data artifact with the held-out split (kiln data build)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML: an optimize section or a pipeline config."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override: --set target=onnx-int8-dynamic (repeatable)."),
    ] = None,
) -> None:
    """Optimize one model outside a pipeline; quality measured on --data's held-out split.

    Example: kiln optimize model runs/quickstart/train --data runs/quickstart/data --out opt
    """
    from modelkiln.optimize.stage import load_section, optimize_source

    with guard():
        cfg = load_section(config, set_ or [])
        result = optimize_source(source, data, cfg, out, RichProgress(console))
    console.print(result.table, highlight=False, soft_wrap=True)
    console.print(f"promoted: {result.chosen or 'nothing'}; report: {result.report_path}")


@optimize_app.command("cnn")
def optimize_cnn_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("runs/cnn"),
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="A plain nn.Module checkpoint (module.json + model.safetensors, or a "
            "torch.export .pt2) to optimize instead of training the digits CNN.",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML with CNN settings.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override: --set prune_ratio=0.25 (repeatable)."),
    ] = None,
) -> None:
    """The plain-PyTorch path on scikit-learn's digits: fusion, static int8, pruning, distillation.

    Example: kiln optimize cnn --out runs/cnn --set prune_criterion=taylor
    """
    from modelkiln.optimize.vision.config import load_cnn_config
    from modelkiln.optimize.vision.pipeline import optimize_cnn

    with guard():
        cfg = load_cnn_config(config, set_ or [])
        result = optimize_cnn(cfg, out, checkpoint=checkpoint)
    console.print(result.table, highlight=False, soft_wrap=True)


@optimize_app.command("methods")
def optimize_methods() -> None:
    """List the optimization methods (variants) by name, family and backend."""
    from modelkiln.optimize.registry import VARIANTS

    table = Table(title="optimization methods (optimize.methods / optimize.target)")
    for col in ("name", "family", "backend", "what it does"):
        table.add_column(col, overflow="fold")
    for name in VARIANTS.names():
        cls = VARIANTS.get(name)
        table.add_row(name, cls.family, cls.backend, cls.summary)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``optimize`` to the root app."""
    app.add_typer(optimize_app, name="optimize")
