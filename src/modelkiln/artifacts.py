"""Run directories, manifests and atomic artifact writes.

Layout: ``<runs_dir>/<run>/<stage>/`` holds a stage's outputs plus
``manifest.json``. A stage writes into a hidden temporary sibling
(``.tmp-<stage>-<id>``) and the directory is renamed into place only after
the manifest is written, so a crash or SIGKILL mid-write leaves nothing that
:func:`load_artifact` would accept. The manifest is written last and records
the sha256 of every output file, so a truncated or edited artifact is caught.

Example:
    >>> with stage_writer(Path("runs/demo"), "data") as out:
    ...     (out.path / "x.txt").write_text("hi")
    ...     out.metrics["files"] = 1
    >>> load_artifact(Path("runs/demo/data")).metrics
    {'files': 1}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from modelkiln.errors import ArtifactError

MANIFEST = "manifest.json"
VERSIONED_PACKAGES = ("modelkiln", "torch", "transformers", "tokenizers", "datasets", "peft")
_HASH_CHUNK = 1 << 20


class InputRef(BaseModel):
    """An artifact a stage consumed: where it was and what its manifest hashed to."""

    path: str
    sha256: str


class Manifest(BaseModel):
    """What a stage did: its config, inputs and outputs (with sha256), metrics and versions."""

    stage: str
    config: dict[str, Any]
    cache_key: str
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    started: str
    finished: str


@dataclass
class Artifact:
    """A finished stage directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def metrics(self) -> dict[str, Any]:
        """The stage's recorded metrics."""
        return self.manifest.metrics

    @property
    def sha256(self) -> str:
        """Hash of the manifest file: identifies this exact artifact."""
        return sha256_file(self.path / MANIFEST)


@dataclass
class PendingArtifact:
    """A stage directory being written; becomes an :class:`Artifact` on success."""

    path: Path
    stage: str
    metrics: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """Map every file under ``root`` (except the manifest) to its sha256, sorted by path."""
    hashes: dict[str, str] = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel != MANIFEST:
            hashes[rel] = sha256_file(file)
    return hashes


def hash_json(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what an artifact contains."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def now() -> str:
    """Current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temporary stage directories left behind by a crashed or killed write."""
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def stage_writer(
    run_dir: Path,
    stage: str,
    *,
    config: dict[str, Any] | None = None,
    cache_key: str = "",
    inputs: dict[str, Artifact] | None = None,
) -> Iterator[PendingArtifact]:
    """Write a stage's artifact atomically.

    Yields a :class:`PendingArtifact` whose ``path`` is a temporary directory.
    On normal exit the manifest is written last and the directory renamed to
    ``run_dir/stage`` (replacing an older one). On an exception the temporary
    directory is deleted and the previous artifact, if any, stays untouched.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = run_dir / f".tmp-{stage}-{token}"
    tmp.mkdir()
    pending = PendingArtifact(path=tmp, stage=stage)
    started = now()
    try:
        yield pending
        manifest = Manifest(
            stage=stage,
            config=config or {},
            cache_key=cache_key,
            inputs={
                name: InputRef(path=str(a.path), sha256=a.sha256)
                for name, a in (inputs or {}).items()
            },
            outputs=hash_tree(tmp),
            metrics=pending.metrics,
            versions=package_versions(),
            started=started,
            finished=now(),
        )
        _write_json_atomic(tmp / MANIFEST, manifest.model_dump(mode="json"))
        final = run_dir / stage
        old = run_dir / f".old-{stage}-{token}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_artifact(path: str | Path, *, verify: bool = True) -> Artifact:
    """Load a finished stage directory.

    Args:
        path: the stage directory (``runs/<run>/<stage>``).
        verify: re-hash every output and compare with the manifest.

    Raises:
        ArtifactError: no manifest (never finished), unreadable manifest, or an
            output file missing or changed since it was written.
    """
    p = Path(path)
    mf = p / MANIFEST
    if not mf.is_file():
        raise ArtifactError(
            f"{p} is not a finished artifact (no {MANIFEST})",
            hint="run the stage that produces it (kiln pipeline run CONFIG)",
        )
    try:
        manifest = Manifest.model_validate_json(mf.read_text(encoding="utf-8"))
    except (ValidationError, ValueError) as exc:
        raise ArtifactError(
            f"{mf} is corrupt ({exc.__class__.__name__})", hint="delete the directory and re-run"
        ) from exc
    if verify:
        actual = hash_tree(p)
        for rel, digest in manifest.outputs.items():
            if actual.get(rel) != digest:
                state = "missing" if rel not in actual else "changed"
                raise ArtifactError(
                    f"{p}: output {rel!r} is {state} since the stage wrote it",
                    hint="delete the directory and re-run the stage",
                )
    return Artifact(path=p, manifest=manifest)
