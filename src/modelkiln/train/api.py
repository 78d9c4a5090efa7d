"""Library entry points: :func:`train`, :func:`load_trained`, :func:`merge`, and the
handbook's :class:`CodeModelTrainer` and :class:`DistributedTrainer` facades.

Example:
    >>> art = train(TrainConfig(), data="runs/q/data", tokenizer="runs/q/tokenizer",
    ...             run_dir=Path("runs/q"))
    >>> report = merge(art.path, Path("runs/q/merged"))
    >>> report.max_abs_diff <= report.atol
    True
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.artifacts import Artifact, hash_json, load_artifact, stage_writer
from modelkiln.configbase import load_section
from modelkiln.contract.merge import MERGE_ATOL, MergeReport, load_trained
from modelkiln.contract.merge import merge_train_artifact as merge
from modelkiln.errors import ArtifactError, KilnError
from modelkiln.progress import QUIET, Progress
from modelkiln.train.config import TrainConfig
from modelkiln.train.stage import STAGE, train_into

if TYPE_CHECKING:
    from transformers import TrainerCallback

"""Max abs logit difference allowed between the merged model and base + adapter (fp32)."""


# merge / load_trained live in the artifact contract (optimize uses them too); kept here as
# the train package's public names.
__all__ = [
    "MERGE_ATOL",
    "CodeModelTrainer",
    "DistributedTrainer",
    "MergeReport",
    "load_trained",
    "merge",
    "train",
    "train_other_rank",
]


def _maybe_artifact(path: str | Path | None) -> Artifact | None:
    if path is None:
        return None
    try:
        return load_artifact(path, verify=False)
    except KilnError:
        return None


def train(
    cfg: TrainConfig,
    *,
    data: str | Path,
    tokenizer: str | Path | None = None,
    run_dir: str | Path = Path("runs/train"),
    seed: int = 0,
    resume: bool | None = None,
    progress: Progress = QUIET,
    callbacks: Sequence[TrainerCallback] = (),
) -> Artifact:
    """Train as configured and write the artifact ``<run_dir>/train`` atomically.

    Args:
        cfg: the train config.
        data: data artifact directory (with ``corpus/``) or a corpus ``DatasetDict`` folder.
        tokenizer: tokenizer artifact or folder; may be None when the model brings its own.
        run_dir: run directory; checkpoints go to ``<run_dir>/checkpoints/train``.
        seed: seed used when ``cfg.seed`` is None.
        resume: override ``cfg.resume`` (continue from the latest complete checkpoint).
        progress: progress sink.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Under torchrun (:mod:`modelkiln.train.launch`) every process trains; only rank 0
    writes the artifact, the others return it once rank 0 has.

    Returns:
        The finished artifact (layout: :mod:`modelkiln.train.outputs`).
    """
    from modelkiln.train.engine import barrier, is_main_process

    run = Path(run_dir)
    effective_seed = cfg.seed if cfg.seed is not None else seed
    if not is_main_process():
        train_other_rank(cfg, data=data, tokenizer=tokenizer, run_dir=run, seed=effective_seed,
                         resume=resume, callbacks=callbacks)  # fmt: skip
        barrier()  # rank 0 has written the artifact
        return load_artifact(run / STAGE)
    inputs = {k: a for k, p in (("data", data), ("tokenizer", tokenizer))
              if (a := _maybe_artifact(p)) is not None}  # fmt: skip
    key = hash_json({"config": cfg.model_dump(mode="json"), "seed": effective_seed,
                     "data": str(data), "tokenizer": str(tokenizer)})  # fmt: skip
    with stage_writer(
        run, STAGE, config=cfg.model_dump(mode="json"), cache_key=key, inputs=inputs
    ) as pending:
        result = train_into(
            cfg, pending.path, data=data, tokenizer=tokenizer, run_dir=run,
            seed=effective_seed, resume=resume, progress=progress, callbacks=callbacks,
        )  # fmt: skip
        pending.metrics.update(result.metrics())
    barrier()  # the other ranks read the artifact now
    return load_artifact(run / STAGE)


def train_other_rank(
    cfg: TrainConfig,
    *,
    data: str | Path,
    tokenizer: str | Path | None,
    run_dir: Path,
    seed: int,
    resume: bool | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> None:
    """A rank other than 0 of a torchrun launch: train along with rank 0, write no artifact.

    Same inputs, seed and checkpoint folder as rank 0's :func:`train`; the phase outputs
    this rank would write go to a temporary folder that is deleted.
    """
    from modelkiln.train.phases import fit
    from modelkiln.train.stage import checkpoint_root

    with tempfile.TemporaryDirectory(prefix="kiln-rank-") as tmp:
        fit(
            cfg, data=data, tokenizer=tokenizer, out=Path(tmp), ckpt_root=checkpoint_root(run_dir),
            seed=seed, final_dir=run_dir / STAGE, resume=resume, callbacks=callbacks,
        )  # fmt: skip


class _TrainerFacade:
    """What the handbook's trainer facades share: a validated config, a run directory and
    the artifact of the last :meth:`train`, which :meth:`merge` turns into a full model."""

    def __init__(
        self, raw: dict[str, Any], overrides: Sequence[str], who: str, output_dir: str | Path,
        seed: int,
    ) -> None:  # fmt: skip
        self.config = load_section(TrainConfig, raw, list(overrides), label=who)
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.artifact: Artifact | None = None

    def merge(self, out_dir: str | Path | None = None) -> MergeReport:
        """Merge the trained adapter into a full model (default ``<output_dir>/merged``)."""
        if self.artifact is None:
            raise ArtifactError("nothing trained yet", hint="call train() first")
        return merge(self.artifact.path, out_dir or self.output_dir / "merged")


class CodeModelTrainer(_TrainerFacade):
    """The handbook's trainer: a code LM fine-tuned with LoRA, QLoRA or fully.

    A thin facade over :func:`train`: the arguments become a :class:`TrainConfig`
    (``config`` shows it). ``model_name="scratch"`` pretrains a small model on
    the corpus first, then fine-tunes it on the domain modules; any other name
    (HF id or local directory) is fine-tuned directly.

    Example:
        >>> trainer = CodeModelTrainer(model_name="scratch", use_lora=True, r=16, alpha=32)
        >>> art = trainer.train(data="runs/q/data", tokenizer="runs/q/tokenizer")
        >>> trainer.merge()  # full HF model in <output_dir>/merged
    """

    def __init__(
        self,
        model_name: str = "scratch",
        use_lora: bool = True,
        r: int = 16,
        alpha: int = 32,
        *,
        use_qlora: bool = False,
        num_epochs: float | None = None,
        learning_rate: float | None = None,
        output_dir: str | Path = "runs/code-model",
        seed: int = 0,
        overrides: Sequence[str] = (),
    ) -> None:
        method: dict[str, Any] = {"method": "full"}
        if use_lora or use_qlora:
            method = {"method": "qlora" if use_qlora else "lora", "r": r, "alpha": alpha}
        finetune: dict[str, Any] = {"method": method}
        if num_epochs is not None:
            finetune.update(max_steps=0, epochs=num_epochs)
        if learning_rate is not None:
            finetune["learning_rate"] = learning_rate
        raw: dict[str, Any] = {
            "model": {"source": model_name},
            "pretrain": {"enabled": model_name == "scratch"},
            "finetune": finetune,
        }
        super().__init__(raw, overrides, "CodeModelTrainer", output_dir, seed)

    def train(
        self,
        data: str | Path,
        tokenizer: str | Path | None = None,
        *,
        resume: bool | None = None,
        progress: Progress = QUIET,
    ) -> Artifact:
        """Train into ``<output_dir>/train`` and return the artifact."""
        self.artifact = train(
            self.config, data=data, tokenizer=tokenizer, run_dir=self.output_dir,
            seed=self.seed, resume=resume, progress=progress,
        )  # fmt: skip
        return self.artifact


class DistributedTrainer(_TrainerFacade):
    """The handbook's distributed trainer: :func:`train` on several processes (torchrun).

    Each of the ``nproc`` processes (per node) trains a replica (DDP), a shard (FSDP) or
    a ZeRO partition (DeepSpeed) of the model; by default they split the configured
    global batch so the result matches the 1-process run. On CPU the processes talk
    over gloo, on GPUs over nccl. Only rank 0 writes the artifact.

    Example:
        >>> trainer = DistributedTrainer(TrainConfig(), nproc=2, strategy="ddp",
        ...                              output_dir="runs/ddp")
        >>> art = trainer.train(data="runs/q/data", tokenizer="runs/q/tokenizer")
        >>> art.metrics["finetune"]["eval_loss_after"]

        Two nodes (run on each, ``node_rank`` 0 and 1, with a shared ``output_dir``)::

            DistributedTrainer(cfg, nproc=8, nnodes=2, node_rank=0,
                               master_addr="node0.example", master_port=29500)

    Args:
        config: the train config (default: :class:`TrainConfig` defaults).
        nproc: processes per node.
        nnodes: number of nodes.
        node_rank: this node's index (0 on the master node).
        master_addr: address of node 0.
        master_port: rendezvous port on node 0.
        strategy: override ``config.distributed.strategy`` (ddp, fsdp, deepspeed).
        output_dir: run directory (artifact in ``<output_dir>/train``).
        seed: seed when ``config.seed`` is None.
        overrides: ``key=value`` overrides applied to the config.

    Raises:
        ConfigError: bad launch values or config.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        nproc: int = 2,
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        strategy: str | None = None,
        output_dir: str | Path = "runs/distributed",
        seed: int = 0,
        overrides: Sequence[str] = (),
    ) -> None:
        from modelkiln.train.launch import LaunchSpec

        raw = (config or TrainConfig()).model_dump(mode="json")
        if strategy is not None:
            raw["distributed"]["strategy"] = strategy
        super().__init__(raw, overrides, "DistributedTrainer", output_dir, seed)
        self.spec = LaunchSpec(nproc, nnodes, node_rank, master_addr, master_port).validate()

    def train(
        self,
        data: str | Path,
        tokenizer: str | Path | None = None,
        *,
        resume: bool | None = None,
        progress: Progress = QUIET,
    ) -> Artifact:
        """Train on all processes into ``<output_dir>/train`` and return the artifact.

        Raises:
            DependencyMissingError: the strategy's library (DeepSpeed) is not installed.
            StageError: a worker process failed.
        """
        from modelkiln.train.launch import launch_train

        self.artifact = launch_train(
            self.config, self.spec, data=data, tokenizer=tokenizer, run_dir=self.output_dir,
            seed=self.seed, resume=resume, progress=progress,
        )  # fmt: skip
        return self.artifact
