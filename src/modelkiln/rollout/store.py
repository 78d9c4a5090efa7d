"""Files of the model registry: kind detection, copy or hard-link in, hashing, verification.

Kept apart from the SQLite metadata (:mod:`.registry`) so the slow part of
``add`` (copying and hashing) runs outside the write transaction.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from modelkiln.artifacts import MANIFEST, sha256_file
from modelkiln.contract import (
    ADAPTER_CONFIG,
    EVAL_CARD,
    MONITOR_PROFILE_DIR,
    MONITOR_PROFILE_JSON,
)
from modelkiln.errors import ArtifactError

HF_CONFIG = "config.json"
# The monitor's reference profile of the model; carried along when a version has one.
REFERENCE_PROFILE = f"{MONITOR_PROFILE_DIR}/{MONITOR_PROFILE_JSON}"
CARRIED = {"manifest": MANIFEST, "eval_card": EVAL_CARD, "reference_profile": REFERENCE_PROFILE}
KINDS = ("hf", "onnx", "peft")


def detect_kind(path: Path) -> str:
    """Which kind of model folder ``path`` is: ``peft``, ``onnx`` or ``hf``.

    Raises:
        ArtifactError: not a folder, or none of the three layouts.
    """
    if not path.is_dir():
        raise ArtifactError(
            f"{path} is not a directory",
            hint="pass a model folder (HF save_pretrained, an ONNX variant or a PEFT adapter)",
        )
    if (path / ADAPTER_CONFIG).is_file():
        return "peft"
    if any(path.glob("*.onnx")):
        return "onnx"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise ArtifactError(
        f"{path} is not a model folder (no {ADAPTER_CONFIG}, *.onnx or {HF_CONFIG})",
        hint="pass a folder written by save_pretrained, an ONNX variant or a PEFT adapter",
    )


def hash_files(root: Path) -> dict[str, str]:
    """Map every file under ``root`` to its sha256 (relative POSIX paths, sorted)."""
    return {
        f.relative_to(root).as_posix(): sha256_file(f)
        for f in sorted(p for p in root.rglob("*") if p.is_file())
    }


def import_tree(src: Path, dest: Path, *, link: bool) -> dict[str, str]:
    """Copy (or hard-link) ``src`` into the new folder ``dest``; make it read-only; hash it.

    Hard links share the inode with the source: editing the source later then
    changes the registry's file too, which :func:`verify_tree` catches at load.
    """
    dest.mkdir(parents=True)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(file, target)
                continue
            except OSError:  # another filesystem: fall back to a copy
                pass
        shutil.copy2(file, target)
    hashes = hash_files(dest)
    for file in dest.rglob("*"):
        if file.is_file() and not link:
            file.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return hashes


def verify_tree(root: Path, expected: dict[str, str], label: str) -> None:
    """Re-hash ``root`` and compare with the hashes recorded at registration.

    Raises:
        ArtifactError: a file is missing, changed, or was added since.
    """
    if not root.is_dir():
        raise ArtifactError(
            f"{label}: its files are gone ({root})",
            hint="re-register the model (kiln registry add) or use another version",
        )
    actual = hash_files(root)
    for rel, digest in expected.items():
        if rel not in actual:
            _tampered(label, rel, "missing")
        if actual[rel] != digest:
            _tampered(label, rel, "changed")
    for rel in actual.keys() - expected.keys():
        _tampered(label, rel, "added")


def _tampered(label: str, rel: str, state: str) -> None:
    raise ArtifactError(
        f"{label}: file {rel!r} was {state} after registration; refusing to load it",
        hint="register the model again as a new version (kiln registry add NAME PATH)",
    )


def remove_tree(path: Path) -> None:
    """Delete a version folder, read-only files included."""
    if not path.exists():
        return
    for p in path.rglob("*"):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
    shutil.rmtree(path)


def carried_files(hashes: dict[str, str]) -> dict[str, str]:
    """Which of the manifest / eval card / reference profile a version carries."""
    return {key: name for key, name in CARRIED.items() if name in hashes}
