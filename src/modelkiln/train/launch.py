"""Launch training on several processes (and nodes) with torchrun.

``kiln train --nproc N`` and :class:`~modelkiln.train.api.DistributedTrainer` call
this module: it writes the job (the validated config and paths) to a JSON file,
then runs ``python -m torch.distributed.run`` (torchrun) with this module as the
worker program. torchrun starts N workers per node with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; inside them Hugging Face
``Trainer`` joins the process group (gloo on CPU, nccl on CUDA) and trains with
DDP, FSDP or DeepSpeed (``train.distributed``, see
:mod:`modelkiln.train.distributed`). Every rank trains; only rank 0 writes the
artifact, its manifest and the final weights.

Two kinds of job:

* ``pipeline`` (the CLI): the data and tokenizer stages run first, in this process,
  then the workers run the train stage; rank 0 as the pipeline's stage (same cache
  key and manifest as a 1-process run), the other ranks train along with it and
  write nothing but their RNG states into the checkpoints.
* ``train`` (the library): every worker calls :func:`modelkiln.train.api.train`,
  which is rank-aware.

Several nodes: run the same command on every node with ``--nnodes``,
``--node-rank`` (0 on the master), ``--master-addr`` (the node-0 host) and
``--master-port``; the run directory must be on a filesystem all nodes share.

Example:
    >>> art = launch_train(TrainConfig(), LaunchSpec(nproc=2), data="runs/q/data",
    ...                    tokenizer="runs/q/tokenizer", run_dir="runs/ddp")
    >>> torchrun_command(LaunchSpec(nproc=2), ["-m", "modelkiln.train.launch", "job.json"])[1:4]
    ['-m', 'torch.distributed.run', '--nproc-per-node=2']
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ConfigError, StageError
from modelkiln.progress import QUIET, Progress
from modelkiln.train.config import TrainConfig

if TYPE_CHECKING:
    from modelkiln.artifacts import Artifact
    from modelkiln.config import PipelineConfig

WORKER_MODULE = "modelkiln.train.launch"


@dataclass(frozen=True)
class LaunchSpec:
    """Where and how many training processes torchrun starts.

    Attributes:
        nproc: processes per node (one per GPU on GPU machines).
        nnodes: number of nodes.
        node_rank: this node's index (0 = the master node).
        master_addr: host name or address of node 0.
        master_port: free TCP port on node 0 for the rendezvous.
    """

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        """Processes in all."""
        return self.nproc * self.nnodes

    def validate(self) -> LaunchSpec:
        """Return self when the values make sense.

        Raises:
            ConfigError: a value is out of range (named in the message).
        """
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1 (got {self.nproc})", hint="e.g. --nproc 2")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1 (got {self.nnodes})", hint="e.g. --nnodes 2")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1} "
                f"(--nnodes {self.nnodes})",
                hint="give every node a distinct rank below --nnodes; 0 on the master node",
            )
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(
                f"--master-port {self.master_port} is not a TCP port (1..65535)",
                hint="pick a free port, e.g. 29500",
            )
        if not self.master_addr.strip():
            raise ConfigError("--master-addr is empty", hint="give node 0's host name or address")
        if self.nnodes > 1 and self.master_addr in ("127.0.0.1", "localhost"):
            raise ConfigError(
                f"--master-addr {self.master_addr} cannot be reached from other nodes",
                hint="give node 0's host name or address reachable from every node",
            )
        return self


def torchrun_command(spec: LaunchSpec, program: Sequence[str]) -> list[str]:
    """The torchrun command line running ``program`` (``-m module args`` or ``script args``)."""
    spec.validate()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={spec.nproc}",
        f"--nnodes={spec.nnodes}",
        f"--node-rank={spec.node_rank}",
        f"--master-addr={spec.master_addr}",
        f"--master-port={spec.master_port}",
        *program,
    ]


def run_workers(spec: LaunchSpec, job: dict[str, Any], *, progress: Progress = QUIET) -> None:
    """Run ``job`` on ``spec``'s processes under torchrun and wait for them.

    Raises:
        StageError: a worker failed (torchrun stops the others; their output names the cause).
    """
    with tempfile.TemporaryDirectory(prefix="kiln-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        cmd = torchrun_command(spec, ["-m", WORKER_MODULE, str(job_file)])
        env = os.environ.copy()
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Each worker gets its share of the cores (torchrun would force 1 thread otherwise).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc)))
        progress.message(
            f"launching {spec.world_size} training processes "
            f"({spec.nproc} per node x {spec.nnodes} nodes) with torchrun"
        )
        code = subprocess.run(cmd, env=env, check=False).returncode
    if code != 0:
        raise StageError(
            f"distributed training failed: torchrun exited with code {code}",
            hint="the workers' output above names the error; fix it and re-run "
            "(the run resumes from its last checkpoint)",
        )


def launch_train(
    cfg: TrainConfig,
    spec: LaunchSpec,
    *,
    data: str | Path,
    tokenizer: str | Path | None = None,
    run_dir: str | Path = Path("runs/train"),
    seed: int = 0,
    resume: bool | None = None,
    progress: Progress = QUIET,
) -> Artifact:
    """:func:`modelkiln.train.api.train` on ``spec``'s processes; returns the artifact.

    On a node other than 0 it returns once the workers end, and the artifact is the one
    node 0 wrote (read from the shared run directory).

    Raises:
        ConfigError: bad launch values or a global batch that cannot be split.
        DependencyMissingError: the strategy's library (DeepSpeed) is missing.
        StageError: a worker failed.
    """
    from modelkiln.artifacts import load_artifact
    from modelkiln.train import distributed as tdist
    from modelkiln.train.stage import STAGE

    spec.validate()
    tdist.check_strategy(cfg.distributed, cuda=_cuda())
    for loop in (cfg.pretrain, cfg.finetune):
        if loop.enabled:
            tdist.scale_loop(loop, cfg.distributed, spec.world_size)  # fail before launching
    job = {
        "kind": "train",
        "config": cfg.model_dump(mode="json"),
        "data": str(Path(data).resolve()),
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "run_dir": str(Path(run_dir).resolve()),
        "seed": seed,
        "resume": resume,
    }
    run_workers(spec, job, progress=progress)
    return load_artifact(Path(run_dir) / STAGE)


def launch_pipeline(
    cfg: PipelineConfig, spec: LaunchSpec, *, force: bool = False, progress: Progress = QUIET
) -> None:
    """Run a pipeline's stages up to ``train``, the train stage on ``spec``'s processes.

    The stages before ``train`` run here first (on node 0; other nodes wait for it at
    the rendezvous). Stages after ``train`` are left to a later ordinary run.

    Raises:
        ConfigError: bad launch values, no train stage, or an unsplittable batch.
        DependencyMissingError: the strategy's library (DeepSpeed) is missing.
        StageError: a stage or a worker failed.
    """
    from modelkiln.pipeline import run_pipeline
    from modelkiln.train import distributed as tdist

    spec.validate()
    if "train" not in cfg.stages:
        raise ConfigError("--nproc needs the train stage", hint="run 'kiln train --nproc N'")
    tdist.check_strategy(cfg.train.distributed, cuda=_cuda())
    for loop in (cfg.train.pretrain, cfg.train.finetune):
        if loop.enabled:
            tdist.scale_loop(loop, cfg.train.distributed, spec.world_size)
    stages = cfg.stages[: cfg.stages.index("train") + 1]
    before = stages[:-1]
    if spec.node_rank == 0 and before:
        run_pipeline(
            cfg.model_copy(update={"stages": before}), force=force, progress=progress,
            write_report=False,
        )  # fmt: skip
        if not force and _train_cached(cfg.model_copy(update={"stages": stages})):
            progress.message("stage train: cached (inputs and config unchanged)")
            return
    job = {"kind": "pipeline", "pipeline": cfg.model_dump(mode="json"), "stages": stages,
           "force": force}  # fmt: skip
    run_workers(spec, job, progress=progress)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _stage_inputs(cfg: PipelineConfig, spec: Any) -> dict[str, Artifact]:
    """The input artifacts of ``spec`` in the run directory (as the pipeline resolves them).

    Raises:
        ArtifactError: a required input is missing.
    """
    import contextlib

    from modelkiln.artifacts import load_artifact
    from modelkiln.errors import ArtifactError

    inputs = {r: load_artifact(cfg.run_dir / r) for r in spec.requires}
    for opt in spec.optional:
        with contextlib.suppress(ArtifactError):
            inputs[opt] = load_artifact(cfg.run_dir / opt)
    return inputs


def _train_cached(cfg: PipelineConfig) -> bool:
    from modelkiln.artifacts import load_artifact
    from modelkiln.errors import ArtifactError
    from modelkiln.pipeline import STAGES, cache_key

    spec = STAGES["train"]
    try:
        inputs = _stage_inputs(cfg, spec)
        artifact = load_artifact(cfg.run_dir / "train")
    except ArtifactError:
        return False
    return artifact.manifest.cache_key == cache_key(cfg, spec, inputs)


def _pipeline_worker(job: dict[str, Any]) -> None:
    from modelkiln.config import PipelineConfig
    from modelkiln.train.api import train_other_rank
    from modelkiln.train.engine import is_main_process

    cfg = PipelineConfig.model_validate(job["pipeline"]).model_copy(
        update={"stages": job["stages"]}
    )
    if is_main_process():
        from modelkiln.pipeline import STAGES, run_stage

        # Only the train stage: the launcher built (or forced) the stages before it, and the
        # other ranks already read their artifacts. Same cache key and manifest as 1 process.
        inputs = _stage_inputs(cfg, STAGES["train"])
        run_stage(cfg, "train", inputs, force=job["force"])
        return
    seed = cfg.train.seed if cfg.train.seed is not None else cfg.seed
    train_other_rank(cfg.train, data=cfg.run_dir / "data", tokenizer=cfg.run_dir / "tokenizer",
                     run_dir=cfg.run_dir, seed=seed)  # fmt: skip


def _train_worker(job: dict[str, Any]) -> None:
    from modelkiln.train.api import train

    train(
        TrainConfig.model_validate(job["config"]), data=job["data"], tokenizer=job["tokenizer"],
        run_dir=Path(job["run_dir"]), seed=job["seed"], resume=job["resume"],
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``python -m modelkiln.train.launch JOB.json``, run by torchrun)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise ConfigError(
            "usage: python -m modelkiln.train.launch JOB.json",
            hint="start workers with kiln train --nproc N (or launch_train)",
        )
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(message)s")
    {"pipeline": _pipeline_worker, "train": _train_worker}[job["kind"]](job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
