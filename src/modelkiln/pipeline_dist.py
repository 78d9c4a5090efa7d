"""The pipeline's train stage on several processes (``--nproc``): launcher and torchrun worker.

The stages before ``train`` run first, in this process (on node 0; other nodes
wait for it at the rendezvous), with the pipeline's own input resolution and
cache check; a cached train stage launches nothing. Then the workers
(``python -m modelkiln.pipeline_dist JOB.json`` under torchrun) run the train
stage: rank 0 as the pipeline's stage (same cache key and manifest as a
1-process run), the other ranks train along with it and write nothing but their
RNG states into the checkpoints. Stages after ``train`` are left to a later
ordinary run.

Example:
    >>> launch_pipeline(load_config("configs/quickstart.yaml"), LaunchSpec(nproc=2))
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from modelkiln.config import PipelineConfig
from modelkiln.errors import ConfigError
from modelkiln.pipeline import STAGES, cached_artifact, resolve_inputs, run_pipeline, run_stage
from modelkiln.progress import QUIET, Progress
from modelkiln.train.launch import LaunchSpec, prepare_launch, run_workers
from modelkiln.train.worker import worker_main

__all__ = ["WORKER_MODULE", "launch_pipeline", "main"]

WORKER_MODULE = "modelkiln.pipeline_dist"


def launch_pipeline(
    cfg: PipelineConfig, spec: LaunchSpec, *, force: bool = False, progress: Progress = QUIET
) -> None:
    """Run a pipeline's stages up to ``train``, the train stage on ``spec``'s processes.

    Raises:
        ConfigError: bad launch values, no train stage, or an unsplittable batch.
        DependencyMissingError: the strategy's library (DeepSpeed) is missing.
        StageError: a stage or a worker failed.
    """
    if "train" not in cfg.stages:
        raise ConfigError("--nproc needs the train stage", hint="run 'kiln train --nproc N'")
    prepare_launch(cfg.train, spec)
    stages = cfg.stages[: cfg.stages.index("train") + 1]
    before = stages[:-1]
    if spec.node_rank == 0 and before:
        run_pipeline(
            cfg.model_copy(update={"stages": before}), force=force, progress=progress, report=None
        )
        if not force and _train_cached(cfg.model_copy(update={"stages": stages})):
            progress.message("stage train: cached (inputs and config unchanged)")
            return
    job = {"pipeline": cfg.model_dump(mode="json"), "stages": stages, "force": force}
    run_workers(spec, job, progress=progress, module=WORKER_MODULE)


def _train_cached(cfg: PipelineConfig) -> bool:
    from modelkiln.errors import StageError

    try:
        inputs = resolve_inputs(cfg, STAGES["train"])
    except StageError:  # an input is missing: the workers' run says which
        return False
    return cached_artifact(cfg, "train", inputs) is not None


def _worker(job: dict[str, Any]) -> None:
    from modelkiln.train.api import train_other_rank
    from modelkiln.train.engine import is_main_process

    cfg = PipelineConfig.model_validate(job["pipeline"])
    cfg = cfg.model_copy(update={"stages": job["stages"]})
    if is_main_process():
        # Only the train stage: the launcher built (or forced) the stages before it, and the
        # other ranks already read their artifacts. Same cache key and manifest as 1 process.
        run_stage(cfg, "train", resolve_inputs(cfg, STAGES["train"]), force=job["force"])
        return
    seed = cfg.train.seed if cfg.train.seed is not None else cfg.seed
    train_other_rank(cfg.train, data=cfg.run_dir / "data", tokenizer=cfg.run_dir / "tokenizer",
                     run_dir=cfg.run_dir, seed=seed)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``python -m modelkiln.pipeline_dist JOB.json``, run by torchrun)."""
    return worker_main(argv, _worker, WORKER_MODULE)


if __name__ == "__main__":
    sys.exit(main())
