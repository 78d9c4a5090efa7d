"""Launch training on several processes (and nodes) with torchrun.

``kiln train --nproc N`` and :class:`~modelkiln.train.api.DistributedTrainer` call
this module: it writes the job (the validated config and paths) to a JSON file,
then runs ``python -m torch.distributed.run`` (torchrun) with
:mod:`modelkiln.train.worker` as the worker program. torchrun starts N workers
per node with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; inside them Hugging Face
``Trainer`` joins the process group (gloo on CPU, nccl on CUDA) and trains with
DDP, FSDP or DeepSpeed (``train.distributed``, see
:mod:`modelkiln.train.distributed`). Every rank trains; only rank 0 writes the
artifact, its manifest and the final weights.

The ``train`` job (the library): every worker calls
:func:`modelkiln.train.api.train`, which is rank-aware. The pipeline's own
``--nproc`` run (``kiln pipeline run --nproc`` / ``kiln train --nproc``) is wired in
:mod:`modelkiln.pipeline_dist`, which uses :func:`run_workers` with its own worker.

Several nodes: run the same command on every node with ``--nnodes``,
``--node-rank`` (0 on the master), ``--master-addr`` (the node-0 host) and
``--master-port``; the run directory must be on a filesystem all nodes share.

Example:
    >>> art = launch_train(TrainConfig(), LaunchSpec(nproc=2), data="runs/q/data",
    ...                    tokenizer="runs/q/tokenizer", run_dir="runs/ddp")
    >>> torchrun_command(LaunchSpec(nproc=2), ["-m", "modelkiln.train.worker", "job.json"])[1:4]
    ['-m', 'torch.distributed.run', '--nproc-per-node=2']
"""

from __future__ import annotations

import json
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

WORKER_MODULE = "modelkiln.train.worker"


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


def run_workers(
    spec: LaunchSpec,
    job: dict[str, Any],
    *,
    progress: Progress = QUIET,
    module: str = WORKER_MODULE,
) -> None:
    """Run ``job`` on ``spec``'s processes under torchrun (``python -m module JOB.json``), wait.

    Raises:
        StageError: a worker failed (torchrun stops the others; their output names the cause).
    """
    with tempfile.TemporaryDirectory(prefix="kiln-launch-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        cmd = torchrun_command(spec, ["-m", module, str(job_file)])
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


def prepare_launch(cfg: TrainConfig, spec: LaunchSpec) -> None:
    """Check the launch values and the strategy, and scale the loops to the world size.

    Called before any worker starts, so a bad value fails here in one line.

    Raises:
        ConfigError: bad launch values or a global batch that cannot be split.
        DependencyMissingError: the strategy's library (DeepSpeed) is missing.
    """
    from modelkiln.train import distributed as tdist

    spec.validate()
    tdist.check_strategy(cfg.distributed, cuda=_cuda())
    for loop in (cfg.pretrain, cfg.finetune):
        if loop.enabled:
            tdist.scale_loop(loop, cfg.distributed, spec.world_size)


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
    from modelkiln.train.stage import STAGE

    prepare_launch(cfg, spec)
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
