"""The ``kiln`` command line: thin typer commands that parse, call the library, render.

No logic lives here. Heavy modules (torch, transformers) are imported inside
the commands that need them, so ``kiln --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelkiln import __version__
from modelkiln.errors import KilnError
from modelkiln.pipeline import PLANNED, STAGES
from modelkiln.progress import Progress

if TYPE_CHECKING:
    from rich.progress import TaskID

    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import PipelineResult

console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

QUICKSTART = Path("configs/quickstart.yaml")


def _stages_epilog() -> str:
    rows = [f"  {n:<10} {s.description}" for n, s in STAGES.items()]
    rows += [f"  {n:<10} {d} — not built yet" for n, d in PLANNED.items()]
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
data_app = typer.Typer(
    help="Build the offline code datasets and the tokenizer.", no_args_is_help=True
)
pipeline_app = typer.Typer(help="Run pipelines from YAML configs.", no_args_is_help=True)
train_app = typer.Typer(
    help="Pretrain / fine-tune (full, LoRA, QLoRA, AdaLoRA, prompt tuning, IA3); merge adapters."
    "\n\nWith no sub-command: run the train stage (data and tokenizer first if needed); "
    "a killed run resumes from its last checkpoint."
    "\n\nExample: kiln train --config configs/quickstart.yaml --set train.finetune.method.r=8"
)
optimize_app = typer.Typer(
    help="Quantize, prune, distill and export a model behind quality gates; benchmark the "
    "variants on this machine and promote the fastest one that passes."
    "\n\nWith no sub-command: run the optimize stage of a pipeline (building data, tokenizer "
    "and train first if needed)."
    "\n\nExample: kiln optimize model runs/quickstart/train --data runs/quickstart/data "
    "--out optimized --set methods=[onnx-fp32,onnx-int8-dynamic]"
)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(optimize_app, name="optimize")
app.add_typer(pipeline_app, name="pipeline")


class RichProgress(Progress):
    """Draws library progress as rich progress bars."""

    def __init__(self, con: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bars

        self.console = con
        self.bars = Bars(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=con,
            transient=True,
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


@app.callback()
def main_callback(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """modelkiln: fine-tune, compress, serve, benchmark and monitor transformer models."""
    _state["debug"] = debug


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

    colours = {
        "ran": "green",
        "cached": "cyan",
        "unavailable": "yellow",
        "blocked": "yellow",
        "failed": "red",
    }
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
    from modelkiln.pipeline import run_pipeline

    with guard():
        result = run_pipeline(cfg, force=force, progress=RichProgress(console))
    _summary(result)


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


@app.command()
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


def _quickstart_config() -> Path:
    if QUICKSTART.is_file():
        return QUICKSTART
    from importlib import resources

    return Path(str(resources.files("modelkiln") / "recipes" / "quickstart.yaml"))


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


@train_app.callback(invoke_without_command=True)
def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    force: ForceOpt = False,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Training processes per node (torchrun; DDP/FSDP/ZeRO).")
    ] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes of a multi-node run.")] = 1,
    node_rank: Annotated[
        int, typer.Option("--node-rank", help="This node's index (0 = master).")
    ] = 0,
    master_addr: Annotated[
        str, typer.Option("--master-addr", help="Address of node 0 (multi-node).")
    ] = "127.0.0.1",
    master_port: Annotated[
        int, typer.Option("--master-port", help="Rendezvous port on node 0.")
    ] = 29500,
) -> None:
    """Run the train stage (building data and tokenizer first if needed); resumes if killed.

    With --nproc N (and --nnodes/--node-rank/--master-addr/--master-port on several
    nodes) the train stage runs on N processes per node under torchrun, with the same
    global batch as one process (train.distributed sets DDP, FSDP or DeepSpeed).

    Example: kiln train --config configs/quickstart.yaml --set train.finetune.method.r=8
    Example: kiln train --nproc 2 --set train.distributed.strategy=ddp
    """
    if ctx.invoked_subcommand is not None:
        return
    with guard():
        cfg = _load(
            config or _quickstart_config(), set_, run, runs_dir, ["data", "tokenizer", "train"]
        )
        if nproc != 1 or nnodes != 1:
            from modelkiln.train.launch import LaunchSpec, launch_pipeline

            spec = LaunchSpec(nproc, nnodes, node_rank, master_addr, master_port)
            launch_pipeline(cfg, spec, force=force, progress=RichProgress(console))
            force = False  # the stages are done: the run below only reads and summarises them
    _run(cfg, force)


@train_app.command("merge")
def train_merge(
    artifact: Annotated[Path, typer.Argument(help="A train stage directory (runs/<run>/train).")],
    out: Annotated[Path, typer.Argument(help="Where to write the merged HF model.")],
    atol: Annotated[float, typer.Option(help="Max |logit| difference allowed.")] = 1e-4,
) -> None:
    """Merge a trained adapter into its base and check merged-vs-adapter logits.

    Example: kiln train merge runs/quickstart/train merged-model
    """
    from modelkiln.train.api import merge

    with guard():
        report = merge(artifact, out, atol=atol)
    console.print(
        f"merged {report.method} model: {report.path}; max |logit diff| "
        f"{report.max_abs_diff:.2e} in memory, {report.reload_max_abs_diff:.2e} after reload "
        f"(tolerance {report.atol:.0e})",
        highlight=False,
        soft_wrap=True,
    )


@train_app.command("encoder")
def train_encoder_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = None,
    method: Annotated[
        str | None, typer.Option(help="lora or full (default: encoder.method, lora).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <runs_dir>/<run>/encoder).")
    ] = None,
) -> None:
    """Fine-tune the MiniLM code-search encoder on docstring -> code pairs (LoRA or full).

    Builds the pairs with the data stage when missing, reports MRR@10 and recall@1 on
    held-out modules beside the zero-shot baseline, writes model/, adapter/, report.md.
    Settings: the config's encoder: section or --set encoder.<field>=value.

    Example: kiln train encoder --set encoder.max_steps=200 --set encoder.batch_size=32
    """
    from modelkiln.train.encoder import load_encoder_job, train_encoder

    with guard():
        sets = [*(set_ or []), *([f"encoder.method={method}"] if method else [])]
        job = load_encoder_job(
            config or _quickstart_config(), sets, {"run": run, "runs_dir": runs_dir, "out": out}
        )
        metrics = train_encoder(job, RichProgress(console))
    table = Table(title=f"code search on {metrics['eval_pairs']} held-out pairs")
    for col in ("metric", "zero-shot", "tuned"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("mrr@10", "recall@1"):
        table.add_row(key, f"{metrics[f'zero_shot_{key}']:.3f}", f"{metrics[f'tuned_{key}']:.3f}")
    console.print(table)
    console.print(f"encoder: {metrics['out_dir']}  report: {metrics['report']}", highlight=False)


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


@app.command(
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve models over an OpenAI-compatible HTTP API (kiln serve --help lists the flags).

    Example: kiln serve --model-path runs/quickstart/train/model --port 8000
    """
    from modelkiln.serve.__main__ import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args), prog="kiln serve"))


@app.command()
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
