"""Pickle checkpoints: refused by default; with --allow-pickle only allowlisted globals pass."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from modelkiln.errors import SecurityError
from modelkiln.security.pickles import check_checkpoint


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickles_refused_by_default_and_scanned_when_allowed(tmp_path: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SecurityError, match="refusing pickle checkpoint"):
        check_checkpoint(tmp_path, allow_pickle=False)
    assert check_checkpoint(tmp_path, allow_pickle=True) == [tmp_path / "pytorch_model.bin"]


def test_code_running_pickle_is_refused_even_when_allowed(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(SecurityError, match="system"):
        check_checkpoint(tmp_path, allow_pickle=True)


def test_safetensors_only_directory_passes(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    assert check_checkpoint(tmp_path, allow_pickle=False) == []


def test_pickles_no_loader_reads_do_not_block(tmp_path: Path) -> None:
    for name in ("training_args.bin", "model.pt", "optimizer.pt"):
        (tmp_path / name).write_bytes(b"never loaded by the server")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "pytorch_model.bin").write_bytes(b"not the served weights")
    assert check_checkpoint(tmp_path, allow_pickle=False) == []
    with pytest.raises(SecurityError, match="refusing pickle"):
        check_checkpoint(tmp_path / "model.pt", allow_pickle=False)  # named explicitly
