"""The torchrun worker of :func:`modelkiln.train.launch.launch_train` (``python -m`` this module).

Every worker calls :func:`modelkiln.train.api.train`, which is rank-aware: every
rank trains, only rank 0 writes the artifact. Kept apart from the launcher so
the launcher does not import the training API that imports it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelkiln.errors import ConfigError
from modelkiln.train.config import TrainConfig

__all__ = ["main", "worker_main"]


def _train_worker(job: dict[str, Any]) -> None:
    from modelkiln.train.api import train

    train(
        TrainConfig.model_validate(job["config"]), data=job["data"], tokenizer=job["tokenizer"],
        run_dir=Path(job["run_dir"]), seed=job["seed"], resume=job["resume"],
    )  # fmt: skip


def worker_main(
    argv: Sequence[str] | None, handle: Callable[[dict[str, Any]], None], program: str
) -> int:
    """Read the job file named on the command line, set rank-aware logging, run ``handle``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise ConfigError(
            f"usage: python -m {program} JOB.json",
            hint="start workers with kiln train --nproc N (or launch_train)",
        )
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(message)s")
    handle(job)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``python -m modelkiln.train.worker JOB.json``, run by torchrun)."""
    return worker_main(argv, _train_worker, "modelkiln.train.worker")


if __name__ == "__main__":
    sys.exit(main())
