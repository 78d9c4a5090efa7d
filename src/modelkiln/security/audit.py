"""Tamper-evident audit log: JSONL, hash-chained, with periodic checkpoints.

Every line is one JSON object with ``seq`` (0, 1, 2, ...), ``ts``, ``event``,
the event's fields, and ``prev``: the SHA-256 of the previous line's bytes (64
zeros on the first line). Every ``checkpoint_every`` lines a ``checkpoint``
event records the line count and the chain head, so a verifier (or an external
copy of the checkpoints) can tell how much log existed.

``json.dumps`` with ``ensure_ascii`` escapes newlines, control characters and
non-ASCII in every field, so a user-controlled value can never start a new line.

:func:`verify_audit_log` names the first line that breaks the chain and how:
edited (the next line's ``prev`` disagrees), deleted or inserted (``seq``
jumps), reordered (``seq`` goes back).

Example:
    >>> log = AuditLog("audit.jsonl")
    >>> log.write("key.create", key_id="3f2a...", scope="infer")
    >>> verify_audit_log("audit.jsonl").ok
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.errors import SecurityError

GENESIS = "0" * 64


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    """Append-only writer of the hash-chained log (thread-safe).

    Args:
        path: the JSONL file (appended to; the chain continues from its last line).
        fsync_interval_s: fsync at most this often (0: after every line).
        checkpoint_every: write a checkpoint line every this many lines.
    """

    def __init__(
        self, path: str | Path, fsync_interval_s: float = 1.0, checkpoint_every: int = 100
    ) -> None:
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = self._resume()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._synced = time.monotonic()

    def _resume(self) -> tuple[int, str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        last = b""
        with self.path.open("rb") as f:
            for line in f:
                if line.strip():
                    last = line
        try:
            seq = int(json.loads(last)["seq"]) + 1
        except (ValueError, KeyError, TypeError):
            raise SecurityError(
                f"the last line of audit log {self.path} is not an audit record",
                hint="run 'kiln audit verify' and move the file aside",
            ) from None
        return seq, _line_hash(last)

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (``fields`` must be JSON-serialisable; strings are escaped)."""
        with self._lock:
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
        self._prev = _line_hash(line)
        self._seq += 1

    def close(self) -> None:
        """Flush, fsync and close the file."""
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()


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
