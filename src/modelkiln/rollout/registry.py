"""The model registry: immutable, hashed model versions with SQLite metadata.

Layout of a registry folder::

    registry.db            SQLite (WAL): models, versions, files, events
    models/<name>/<n>/     version n's files (read-only copies or hard links)
    .incoming/<id>/        a version being copied in (never read)

Writes take SQLite's write lock (``BEGIN IMMEDIATE``), so several ``kiln``
processes and servers can use one registry at once. The slow part of ``add``
(copy + sha256) runs before the lock; the version number is allocated and the
folder renamed into place inside it. A failed call leaves the registry as it was.

Example:
    >>> reg = Registry(Path("/tmp/reg"))
    >>> v = reg.add("tiny", Path("runs/quickstart/train/model"))
    >>> reg.promote("tiny", v.version, "production")
    >>> reg.resolve("tiny", "production")   # verified local path
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from modelkiln.artifacts import now
from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.rollout import store
from modelkiln.rollout.schema import SCHEMA

ENV = "MODELKILN_REGISTRY"
KEEP_DEFAULT = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
Stage = Literal["staging", "production"]


class ModelVersion(BaseModel):
    """One registered version of a model."""

    name: str = Field(description="Model name.")
    version: int = Field(description="Version number, from 1.")
    kind: str = Field(description="hf, onnx or peft.")
    stage: str = Field(description="none, staging, production, previous, rolled-back or archived.")
    source: str = Field(description="Where the files were registered from.")
    created: str = Field(description="When it was registered (UTC, ISO 8601).")
    files: int = Field(description="Number of files.")
    size_bytes: int = Field(description="Total size of the files.")
    carries: dict[str, str] = Field(description="manifest / eval_card / reference_profile found.")
    path: str = Field(description="Folder of the files inside the registry.")

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"


def default_registry_dir() -> Path:
    """``$MODELKILN_REGISTRY``, else ``$XDG_DATA_HOME/modelkiln/registry`` (~/.local/share)."""
    if env := os.environ.get(ENV):
        return Path(env)
    # Hand-written XDG rule: platformdirs is not a dependency and Linux is the target.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "modelkiln" / "registry"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise ConfigError."""
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid model name {name!r}",
            hint="use letters, digits, '.', '_' or '-' (up to 100 characters)",
        )
    return name


class Registry:
    """A registry folder: add, list, show, promote, archive, roll back and resolve versions."""

    def __init__(self, root: Path | str | None = None, *, keep: int = KEEP_DEFAULT) -> None:
        self.root = Path(root) if root is not None else default_registry_dir()
        if keep < 1:
            raise ConfigError(f"keep={keep} must be >= 1", hint="keep at least 1 version")
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    # -- connections -------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "registry.db", timeout=60.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under SQLite's write lock; rolled back on any error."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- add -----------------------------------------------------------------
    def add(self, name: str, path: Path | str, *, link: bool = False) -> ModelVersion:
        """Register the model folder ``path`` as the next version of ``name``.

        Args:
            name: model name.
            path: an HF folder, an ONNX variant folder or a PEFT adapter folder.
            link: hard-link the files instead of copying them (same filesystem only).

        Raises:
            ArtifactError: ``path`` is not a model folder.
        """
        check_name(name)
        src = Path(path)
        kind = store.detect_kind(src)
        incoming = self.root / ".incoming" / uuid.uuid4().hex
        try:
            hashes = store.import_tree(src, incoming, link=link)
            with self._write() as db:
                version = self._next_version(db, name)
                rel = f"models/{name}/{version}"
                final = self.root / rel
                store.remove_tree(final)  # a crashed add's orphan (no row): ours under the lock
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(incoming, final)
                try:
                    self._insert(db, name, version, kind, str(src.resolve()), final, hashes)
                except BaseException:
                    os.replace(final, incoming)
                    raise
        finally:
            store.remove_tree(incoming)
        return self.show(name, version)

    @staticmethod
    def _next_version(db: sqlite3.Connection, name: str) -> int:
        db.execute("INSERT OR IGNORE INTO models(name, created) VALUES (?, ?)", (name, now()))
        row = db.execute("SELECT MAX(version) FROM versions WHERE name=?", (name,)).fetchone()
        return int(row[0] or 0) + 1

    @staticmethod
    def _insert(
        db: sqlite3.Connection, name: str, version: int, kind: str, src: str, final: Path,
        hashes: dict[str, str],
    ) -> None:  # fmt: skip
        rel = f"models/{name}/{version}"
        db.execute(
            "INSERT INTO versions(name, version, kind, stage, source, path, created, carries)"
            " VALUES (?, ?, ?, 'none', ?, ?, ?, ?)",
            (name, version, kind, src, rel, now(), json.dumps(store.carried_files(hashes))),
        )
        db.executemany(
            "INSERT INTO files(name, version, rel, sha256, size) VALUES (?, ?, ?, ?, ?)",
            [(name, version, r, h, (final / r).stat().st_size) for r, h in hashes.items()],
        )
        db.execute(
            "INSERT INTO events(name, version, action, at) VALUES (?, ?, 'add', ?)",
            (name, version, now()),
        )

    # -- reads ---------------------------------------------------------------
    def list_versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of one model, or of all), oldest first."""
        with self._connect() as db:
            query = "SELECT * FROM versions" + (" WHERE name=?" if name else "")
            rows = db.execute(query + " ORDER BY name, version", (name,) if name else ()).fetchall()
            return [self._row(db, r) for r in rows]

    def show(self, name: str, version: int | str | None = None) -> ModelVersion:
        """One version: a number, ``production``/``staging``/``latest``, or None (= production).

        Raises:
            ArtifactError: the model or version does not exist.
        """
        with self._connect() as db:
            return self._row(db, self._find(db, name, version))

    def _find(self, db: sqlite3.Connection, name: str, version: int | str | None) -> sqlite3.Row:
        sel = "production" if version is None else str(version)
        args: tuple[str | int, ...]
        if sel.isdigit():
            q, args = "name=? AND version=?", (name, int(sel))
        elif sel in ("production", "staging"):
            q, args = "name=? AND stage=? ORDER BY version DESC LIMIT 1", (name, sel)
        elif sel == "latest":
            q, args = "name=? ORDER BY version DESC LIMIT 1", (name,)
        else:
            raise ConfigError(
                f"bad version {sel!r} for {name!r}",
                hint="use a number (from 1), 'production', 'staging' or 'latest'",
            )
        row = db.execute(f"SELECT * FROM versions WHERE {q}", args).fetchone()  # q: fixed text
        if row is None:
            known = [r[0] for r in db.execute("SELECT version FROM versions WHERE name=?", (name,))]
            raise ArtifactError(
                f"no version {sel!r} of model {name!r} in {self.root}"
                + (f" (versions: {known})" if known else " (no such model)"),
                hint="see `kiln registry list`; register with `kiln registry add NAME PATH`",
            )
        return row

    def _row(self, db: sqlite3.Connection, r: sqlite3.Row) -> ModelVersion:
        stats = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE name=? AND version=?",
            (r["name"], r["version"]),
        ).fetchone()
        return ModelVersion(
            name=r["name"], version=r["version"], kind=r["kind"], stage=r["stage"],
            source=r["source"], created=r["created"], files=stats[0], size_bytes=stats[1],
            carries=json.loads(r["carries"]), path=str(self.root / r["path"]),
        )  # fmt: skip

    def hashes(self, name: str, version: int) -> dict[str, str]:
        """The sha256 of every file of a version, as recorded at registration."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT rel, sha256 FROM files WHERE name=? AND version=?", (name, version)
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def resolve(self, name: str, version: int | str | None = None) -> Path:
        """The verified local folder of a version (every file re-hashed).

        Raises:
            ArtifactError: missing version, archived version, or a file changed since.
        """
        mv = self.show(name, version)
        if mv.stage == "archived":
            raise ArtifactError(
                f"{mv.ref} is archived (its files were removed)",
                hint="use a deployable version (kiln registry list) or register it again",
            )
        store.verify_tree(Path(mv.path), self.hashes(name, mv.version), mv.ref)
        return Path(mv.path)

    def events(self, name: str) -> list[dict[str, object]]:
        """The history of a model: add / promote / archive / rollback, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT version, action, at FROM events WHERE name=? ORDER BY id", (name,)
            ).fetchall()
        return [dict(r) for r in rows]

    # -- lifecycle -------------------------------------------------------------
    def promote(self, name: str, version: int, to: Stage) -> ModelVersion:
        """Make ``NAME@VERSION`` the model's staging or production version.

        Promoting to production moves the old production version to ``previous``
        and archives production versions beyond the last ``keep``.

        Raises:
            ArtifactError: missing, archived or tampered version.
            ConfigError: ``to`` is not staging or production.
        """
        if to not in ("staging", "production"):
            raise ConfigError(f"bad stage {to!r}", hint="use --to staging or --to production")
        self.resolve(name, version)  # refuses archived or tampered versions before any change
        with self._write() as db:
            self._find(db, name, version)
            old = "previous" if to == "production" else "none"
            db.execute(
                "UPDATE versions SET stage=? WHERE name=? AND stage=? AND version<>?",
                (old, name, to, version),
            )
            self._set(db, name, version, to, f"promote:{to}")
            doomed = self._enforce_keep(db, name) if to == "production" else []
        for path in doomed:
            store.remove_tree(path)
        return self.show(name, version)

    def rollback(self, name: str) -> ModelVersion:
        """Put the previous deployable production version back into production.

        Raises:
            ArtifactError: no production version, or none before it is deployable.
        """
        with self._connect() as db:
            current = self._find(db, name, "production")
            prev = self._previous(db, name, current["version"])
        self.resolve(name, prev)
        with self._write() as db:
            if self._find(db, name, "production")["version"] != current["version"]:
                raise ArtifactError(
                    f"{name}: production changed during the rollback", hint="run it again"
                )
            self._set(db, name, current["version"], "rolled-back", "rolled-back")
            self._set(db, name, prev, "production", "rollback")
        return self.show(name, prev)

    def archive(self, name: str, version: int) -> ModelVersion:
        """Remove a version's files (metadata and history stay); it is no longer deployable.

        Raises:
            ConfigError: the version is in production.
        """
        with self._write() as db:
            row = self._find(db, name, version)
            if row["stage"] == "production":
                raise ConfigError(
                    f"{name}@{version} is in production and cannot be archived",
                    hint=f"promote another version or run `kiln registry rollback {name}` first",
                )
            self._set(db, name, version, "archived", "archive")
        store.remove_tree(self.root / row["path"])
        return self.show(name, version)

    @staticmethod
    def _set(db: sqlite3.Connection, name: str, version: int, stage: str, action: str) -> None:
        db.execute("UPDATE versions SET stage=? WHERE name=? AND version=?", (stage, name, version))
        db.execute(
            "INSERT INTO events(name, version, action, at) VALUES (?, ?, ?, ?)",
            (name, version, action, now()),
        )

    def _previous(self, db: sqlite3.Connection, name: str, current: int) -> int:
        for v in self._production_history(db, name):
            if v == current:
                continue
            row = self._find(db, name, v)
            if row["stage"] == "previous":
                return v
        raise ArtifactError(
            f"{name}: no earlier production version is deployable to roll back to",
            hint="promote one explicitly: kiln registry promote NAME@VERSION --to production",
        )

    @staticmethod
    def _production_history(db: sqlite3.Connection, name: str) -> list[int]:
        """Versions that were in production, most recent first (each once)."""
        rows = db.execute(
            "SELECT version, MAX(id) AS last FROM events WHERE name=? AND action IN"
            " ('promote:production', 'rollback') GROUP BY version ORDER BY last DESC",
            (name,),
        ).fetchall()
        return [r[0] for r in rows]

    def _enforce_keep(self, db: sqlite3.Connection, name: str) -> list[Path]:
        """Archive ``previous`` versions beyond the last ``keep`` production versions."""
        doomed = []
        for v in self._production_history(db, name)[self.keep :]:
            row = self._find(db, name, v)
            if row["stage"] in ("previous", "rolled-back"):
                self._set(db, name, v, "archived", "archive:keep")
                doomed.append(self.root / row["path"])
        return doomed
