"""Training text selection, tokenization and sequence packing for causal LM.

The ``data`` artifact's corpus is split by top-level module. Training uses:

* general train / eval: the corpus ``train`` / ``validation`` splits minus the
  domain modules (pretraining never sees the domain);
* domain train / eval: the domain modules' files from ``train`` and
  ``validation`` (never ``test``), split by a hash of each file's path.

Packing: every document is tokenized (special-token strings in the text stay
plain text), followed by ``eos``, concatenated in path order and cut into
``block_size`` blocks; the tail shorter than a block is dropped. The result
depends only on the texts, the tokenizer and ``block_size``: deterministic.
Labels equal the inputs (the model shifts them); documents in one block are
separated by ``eos`` and attend across it, as in GPT-2 pretraining.

Example:
    >>> blocks = pack_texts(["def f():\\n    pass\\n"] * 100, tokenizer, block_size=64)
    >>> BlockDataset(blocks)[0]["input_ids"].shape
    torch.Size([64])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import CORPUS_DIR
from modelkiln.contract import corpus as corpus_reader
from modelkiln.contract.corpus import pack, pack_texts, tokenize
from modelkiln.errors import ConfigError, DataError

# Tokenizing and packing are shared with the optimize stage (the contract layer has them).
__all__ = [
    "CORPUS_DIR",
    "BlockDataset",
    "TextSplits",
    "blocks_digest",
    "blocks_or_error",
    "load_corpus",
    "pack",
    "pack_texts",
    "split_texts",
    "tokenize",
]

if TYPE_CHECKING:
    import torch
    from datasets import DatasetDict


@dataclass
class TextSplits:
    """Documents (source texts) for each phase, in path order."""

    general_train: list[str]
    general_eval: list[str]
    domain_train: list[str]
    domain_eval: list[str]


def load_corpus(data_dir: str | Path) -> DatasetDict:
    """Load the corpus ``DatasetDict`` from a data artifact (or a corpus folder itself).

    Raises:
        ArtifactError: there is no corpus with ``train`` and ``validation`` splits there.
    """
    return corpus_reader.load_corpus(data_dir, required=("train", "validation"))


def _file_score(path: str) -> float:
    digest = hashlib.sha256(("modelkiln-domain:" + path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_texts(corpus: Any, domain_modules: Sequence[str], eval_fraction: float) -> TextSplits:
    """Select general and domain documents (see the module docstring).

    Raises:
        ConfigError: a domain module is in the test split or not in the corpus.
        DataError: a selection ends up empty.
    """
    domain = set(domain_modules)

    def rows(split: str) -> list[tuple[str, str, str]]:
        if split not in corpus:
            return []
        ds = corpus[split]
        return sorted(zip(ds["path"], ds["module"], ds["text"], strict=True))

    train, valid, test = rows("train"), rows("validation"), rows("test")
    in_test = sorted(domain & {m for _, m, _ in test})
    if in_test:
        raise ConfigError(
            f"train.data.domain_modules: {in_test[0]!r} is in the corpus test split, "
            "which training must not see",
            hint="pick domain modules from the train or validation split",
        )
    known = {m for _, m, _ in train + valid}
    absent = sorted(domain - known)
    if absent:
        raise ConfigError(
            f"train.data.domain_modules: {absent[0]!r} is not a module of the corpus",
            hint="name top-level modules of the data artifact, e.g. 'asyncio'",
        )
    domain_rows = sorted(r for r in train + valid if r[1] in domain)
    held = {i for i, (p, _, _) in enumerate(domain_rows) if _file_score(p) < eval_fraction}
    if domain_rows and not held:  # a tiny domain still gets one eval file
        held = {len(domain_rows) - 1}
    splits = TextSplits(
        general_train=[t for _, m, t in train if m not in domain],
        general_eval=[t for _, m, t in valid if m not in domain],
        domain_train=[r[2] for i, r in enumerate(domain_rows) if i not in held],
        domain_eval=[r[2] for i, r in enumerate(domain_rows) if i in held],
    )
    if domain and not splits.domain_train:
        raise DataError(
            f"the domain {sorted(domain)} has too few files to train on",
            hint="add modules to train.data.domain_modules",
        )
    return splits


class BlockDataset:
    """Packed blocks as a map-style dataset of ``{"input_ids", "labels"}`` rows.

    A plain sequence (``__len__`` + ``__getitem__``), which ``DataLoader`` and
    ``Trainer`` accept without subclassing ``torch.utils.data.Dataset``.
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row}


def blocks_or_error(blocks: torch.Tensor, what: str, block_size: int) -> BlockDataset:
    """Wrap ``blocks`` in a :class:`BlockDataset`, raising when there are none."""
    if blocks.shape[0] == 0:
        raise DataError(
            f"the {what} text is shorter than one block of {block_size} tokens",
            hint="lower train.data.block_size or use more data",
        )
    return BlockDataset(blocks)


def blocks_digest(*tensors: torch.Tensor) -> str:
    """sha256 over the packed token blocks: identifies a phase's exact data."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
