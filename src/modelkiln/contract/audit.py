"""The tamper-evident audit log: JSONL, hash-chained, with periodic checkpoints.

Core (in the contract) so that every package that takes an admin action can
audit it (the server, the security plug-in, the rollout controller and gateway,
``kiln keys``) without importing another stage.

Every line is one JSON object with ``seq`` (0, 1, 2, ...), ``ts``, ``event``,
the event's fields, and ``prev``: the SHA-256 of the previous line's bytes (64
zeros on the first line). Every ``checkpoint_every`` lines a ``checkpoint``
event records the line count and the chain head, so a verifier (or an external
copy of the checkpoints) can tell how much log existed.

Several processes may append to one file (a server and ``kiln keys``): each
append takes an exclusive ``flock`` and, when the file grew since this writer's
last line, continues the chain from the file's real last line.

``json.dumps`` with ``ensure_ascii`` escapes newlines, control characters and
non-ASCII in every field, so a user-controlled value can never start a new line.

:func:`verify_audit_log` names the first line that breaks the chain and how:
edited (the next line's ``prev`` disagrees), deleted or inserted (``seq``
jumps), reordered (``seq`` goes back).

Example:
    >>> with AuditLog("audit.jsonl") as log:
    ...     log.write("key.create", actor="cli", key_id="3f2a9c01b7de", scope="infer")
    >>> verify_audit_log("audit.jsonl").ok
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from modelkiln.errors import SecurityError

try:  # POSIX: serialises appends from several processes; elsewhere one writer per file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EVENTS",
    "GENESIS",
    "AuditLog",
    "AuditReport",
    "AuditWriter",
    "verify_audit_log",
]

GENESIS = "0" * 64

#: The event names written by modelkiln, and what each means. Fields common to every
#: line: seq, ts (unix time), event, prev. ``actor``: who acted ("cli", "server",
#: "gateway", a principal subject such as "key:3f2a9c01b7de" or "jwt:ana").
EVENTS: dict[str, str] = {
    "server.start": "a server started: models, security settings (never secrets)",
    "server.stop": "a server stopped",
    "request": "an authenticated request: principal, route, model, status, token counts",
    "auth.failure": "a refused credential: route, reason, client address",
    "admin": "an admin-route request other than the named actions below",
    "adapter.load": "a runtime adapter load asked on /admin/adapters: principal, status",
    "adapter.unload": "a runtime adapter unloaded: principal, adapter id, status",
    "model.accepted": "a model or adapter directory passed the load checks: path, kind, signer",
    "model.refused": "a model or adapter directory was refused at load: path, kind, reason",
    "model.pickle_allowed": "a pickle checkpoint loaded after the allowlist scan",
    "key.create": "a key was created (key_id, scope, models, rpm, tpm, expires)",
    "key.revoke": "a key was revoked (key_id)",
    "key.rotate": "a key was replaced (key_id, new_key_id)",
    "config.reload": "a server re-read a changed configuration file: what, path, changes",
    "rollout.decision": "a rollout controller decided: rollout, action, reason, numbers",
    "rollout.action": "an operator acted on a rollout: rollout, action (start, abort ...)",
    "checkpoint": "chain checkpoint: lines (count so far) and head (hash of the last line)",
}


class AuditWriter(Protocol):
    """Anything that appends audit events (an :class:`AuditLog`, or a test double)."""

    def write(self, event: str, **fields: Any) -> None:
        """Append one event with its fields."""
        ...


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(f: IO[bytes], size: int) -> bytes:
    """The last non-empty line of an open file of ``size`` bytes (read from the end)."""
    chunk = 4096
    while True:
        start = max(0, size - chunk)
        f.seek(start)
        lines = [x for x in f.read(size - start).split(b"\n") if x.strip()]
        # A complete last line: more than one line in the window, or the window is the file.
        if len(lines) > 1 or start == 0:
            return lines[-1] if lines else b""
        chunk *= 4


class AuditLog:
    """Append-only writer of the hash-chained log (thread-safe, several processes may share
    a file).

    Args:
        path: the JSONL file (appended to; the chain continues from its last line).
        fsync_interval_s: fsync at most this often (0: after every line).
        checkpoint_every: write a checkpoint line every this many lines (0: never).

    Raises:
        SecurityError: the file's last line is not an audit record.
    """

    def __init__(
        self, path: str | Path, fsync_interval_s: float = 1.0, checkpoint_every: int = 100
    ) -> None:
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "r+b")
        self._end = -1  # file size after our last line; -1: not read yet
        self._seq, self._prev = 0, GENESIS
        with self._locked():
            self._sync_tail()
        self._synced = time.monotonic()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    def _sync_tail(self) -> None:
        """Continue the chain from the file's last line when someone else appended."""
        size = os.fstat(self._file.fileno()).st_size
        if size == self._end:
            return
        last = _last_line(self._file, size) if size else b""
        if not last:
            self._seq, self._prev = 0, GENESIS
        else:
            try:
                self._seq = int(json.loads(last)["seq"]) + 1
            except (ValueError, KeyError, TypeError):
                raise SecurityError(
                    f"the last line of audit log {self.path} is not an audit record",
                    hint="run 'kiln audit verify' and move the file aside",
                ) from None
            self._prev = _line_hash(last)
        self._end = size

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (``fields`` must be JSON-serialisable; strings are escaped)."""
        with self._lock, self._locked():
            self._sync_tail()
            self._append(event, fields)
            if self.checkpoint_every and self._seq % self.checkpoint_every == 0:
                self._append("checkpoint", {"lines": self._seq, "head": self._prev})
            now = time.monotonic()
            if now - self._synced >= self.fsync_interval_s:
                os.fsync(self._file.fileno())
                self._synced = now

    def _append(self, event: str, fields: dict[str, Any]) -> None:
        record = {"seq": self._seq, "ts": round(time.time(), 6), "event": event}
        record.update({k: v for k, v in fields.items() if k not in record})
        record["prev"] = self._prev
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str).encode()
        self._file.write(line + b"\n")
        self._file.flush()
        self._end = os.fstat(self._file.fileno()).st_size
        self._prev = _line_hash(line)
        self._seq += 1

    def close(self) -> None:
        """Flush, fsync and close the file."""
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class AuditReport:
    """Result of :func:`verify_audit_log`."""

    lines: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chain is intact."""
        return not self.problems


def verify_audit_log(path: str | Path) -> AuditReport:
    """Walk the chain and report every break with its line number (1-based)."""
    report = AuditReport()
    prev_hash, prev_seq = GENESIS, -1
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                report.problems.append(f"line {lineno}: empty line inserted")
                continue
            report.lines += 1
            try:
                rec = json.loads(raw)
                seq, prev = int(rec["seq"]), str(rec["prev"])
            except (ValueError, KeyError, TypeError):
                report.problems.append(f"line {lineno}: not an audit record (edited or inserted)")
                prev_hash = _line_hash(raw)
                continue
            problem = _classify(lineno, seq, prev_seq, prev, prev_hash)
            if problem:
                report.problems.append(problem)
            if rec.get("event") == "checkpoint":
                report.checkpoints += 1
                if rec.get("lines") != seq:
                    report.problems.append(
                        f"line {lineno}: checkpoint count {rec.get('lines')} != its position {seq}"
                    )
            prev_hash, prev_seq = _line_hash(raw), seq
    return report


def _classify(lineno: int, seq: int, prev_seq: int, prev: str, prev_hash: str) -> str | None:
    if seq == prev_seq + 1:
        if prev != prev_hash:
            return f"line {lineno - 1}: edited (line {lineno} carries a different hash of it)"
        return None
    if seq <= prev_seq:
        return f"line {lineno}: out of order or inserted (seq {seq} after {prev_seq})"
    gap = seq - prev_seq - 1
    return f"line {lineno}: {gap} line(s) deleted before it (seq jumps {prev_seq} -> {seq})"
