"""``kiln train``: pretrain / fine-tune, merge adapters, the code-search encoder."""

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

train_app = typer.Typer(
    help="Pretrain / fine-tune (full, LoRA, QLoRA, AdaLoRA, prompt tuning, IA3); merge adapters."
    "\n\nWith no sub-command: run the train stage (data and tokenizer first if needed); "
    "a killed run resumes from its last checkpoint."
    "\n\nExample: kiln train --config configs/quickstart.yaml --set train.finetune.method.r=8"
)


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
            from modelkiln.pipeline_dist import launch_pipeline
            from modelkiln.train.launch import LaunchSpec

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
    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import build_stage
    from modelkiln.train.encoder_job import check_pairs_enabled, load_encoder_job, train_encoder

    with guard():
        sets = [*(set_ or []), *([f"encoder.method={method}"] if method else [])]
        job = load_encoder_job(
            config or _quickstart_config(), sets, {"run": run, "runs_dir": runs_dir, "out": out}
        )
        check_pairs_enabled(job)
        # The pipeline builds (or reuses) the data stage holding the pairs; the job trains.
        data_cfg = PipelineConfig.model_validate(
            {"run": job.run, "runs_dir": job.runs_dir, "data": job.data}
        )
        data = build_stage(data_cfg, "data", progress=RichProgress(console))
        metrics = train_encoder(job, data.path, RichProgress(console))
    table = Table(title=f"code search on {metrics['eval_pairs']} held-out pairs")
    for col in ("metric", "zero-shot", "tuned"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("mrr@10", "recall@1"):
        table.add_row(key, f"{metrics[f'zero_shot_{key}']:.3f}", f"{metrics[f'tuned_{key}']:.3f}")
    console.print(table)
    console.print(f"encoder: {metrics['out_dir']}  report: {metrics['report']}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``train`` to the root app."""
    app.add_typer(train_app, name="train")
