"""Scoped API keys (LiteLLM's key-policy shape: key -> scope, models, rpm, tpm, expiry).

A key looks like ``mk_<id>_<secret>``: the id (public, 12 hex chars) finds the
record, the secret (256 random bits) proves possession. The store — one JSON
file — keeps only ``HMAC-SHA256(server_secret, key)``, compared in constant time.

Why HMAC and not scrypt: the keys are 256-bit random values, so a slow hash adds
no brute-force resistance (there is no dictionary to try), while it would cost
tens of milliseconds per request against a 0.5 ms overhead budget. The HMAC's
server secret lives in a separate file (``<store>.secret``, mode 0600, or
``$MODELKILN_KEY_SECRET``), so a leaked store alone does not even let anyone
confirm a guessed key.

The server re-reads the store when its mtime or size changes, so ``kiln keys
revoke`` takes effect on the next request without a restart; with an audit log
(``KeyStore.audit``), each re-read that changes the keys writes a
``config.reload`` event naming the added, revoked, changed and removed key ids.

Example:
    >>> store = KeyStore("keys.json")
    >>> key, record = store.create(scope="infer", models=["lm"], rpm=60, tpm=10_000)
    >>> store.authenticate(key).key_id == record.id
    True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from modelkiln.contract.audit import AuditWriter
from modelkiln.errors import ConfigError, SecurityError

#: Environment variable holding the HMAC server secret (hex); overrides the secret file.
SECRET_ENV = "MODELKILN_KEY_SECRET"  # nosec B105 (the variable name, not a secret)
Scope = Literal["infer", "embed", "admin"]
SCOPES: tuple[str, ...] = ("infer", "embed", "admin")
_KEY_RE = re.compile(r"^mk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")
_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds in ``30d`` / ``12h`` / ``15m`` / ``90s`` / ``2w``.

    Raises:
        ConfigError: the text is not a number followed by one of s, m, h, d, w.
    """
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ConfigError(f"bad duration {text!r}", hint="write e.g. 30d, 12h, 15m or 90s")
    return float(int(match.group(1)) * _UNITS[match.group(2)])


class Principal(BaseModel):
    """Who is calling and what they may do (from a key record or a JWT's claims)."""

    model_config = ConfigDict(frozen=True)

    subject: str = Field(description="Key id or JWT subject, as written to the audit log.")
    key_id: str = Field(description="Rate-limit bucket id ('key:<id>' or 'jwt:<sub>').")
    scopes: frozenset[str] = Field(description="Granted scopes (infer, embed, admin).")
    models: tuple[str, ...] = Field((), description="Allowed model names; empty = all.")
    rpm: int | None = Field(None, description="Requests per minute; None = unlimited.")
    tpm: int | None = Field(None, description="Tokens per minute; None = unlimited.")

    def allows_model(self, model: str | None) -> bool:
        """Whether ``model`` (``base`` or ``base:adapter``) is on the allowlist."""
        if not self.models or model is None:
            return True
        return model in self.models or model.split(":", 1)[0] in self.models


class KeyRecord(BaseModel):
    """One stored key: its policy and its HMAC, never the key itself."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Public key id (the middle part of the key).")
    hash: str = Field(description="Hex HMAC-SHA256 of the full key under the server secret.")
    scope: Scope = Field(description="infer: completions/chat; embed: embeddings; admin: all.")
    models: list[str] = Field(default_factory=list, description="Allowed models; empty = all.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute; None = unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute; None = unlimited.")
    created: float = Field(description="Unix time of creation.")
    expires: float | None = Field(None, description="Unix time of expiry; None = never.")
    revoked: bool = Field(False, description="Revoked keys are refused.")
    note: str = Field("", description="Free text (owner, purpose).")

    def principal(self) -> Principal:
        """The caller this key stands for."""
        scopes = frozenset(SCOPES) if self.scope == "admin" else frozenset({self.scope})
        return Principal(
            subject=f"key:{self.id}",
            key_id=f"key:{self.id}",
            scopes=scopes,
            models=tuple(self.models),
            rpm=self.rpm,
            tpm=self.tpm,
        )


class KeyStore:
    """A JSON key store, re-read whenever the file changes on disk.

    Args:
        path: the store file (created on the first ``create``).
        secret_file: the HMAC secret (default ``<path>.secret``, created 0600 if absent).
    """

    def __init__(self, path: str | Path, secret_file: str | Path | None = None) -> None:
        self.path = Path(path)
        self.secret_file = Path(secret_file) if secret_file else Path(f"{self.path}.secret")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._loaded = False  # read once: later changes are reloads
        self._records: dict[str, KeyRecord] = {}
        self._secret: bytes | None = None
        #: Where re-reads that change the keys are audited (the server sets it).
        self.audit: AuditWriter | None = None

    # -- secret and hashing -------------------------------------------------------------
    def _server_secret(self, create: bool = False) -> bytes:
        if self._secret is not None:
            return self._secret
        env = os.environ.get(SECRET_ENV)
        if env:
            self._secret = bytes.fromhex(env)
        elif self.secret_file.exists():
            self._secret = bytes.fromhex(self.secret_file.read_text().strip())
        elif create:
            self.secret_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            return self._server_secret()
        else:
            raise SecurityError(
                f"no key-store secret: neither ${SECRET_ENV} nor {self.secret_file} exists",
                hint="create a key with 'kiln keys create' first (it writes the secret file)",
            )
        return self._secret

    def _hash(self, key: str, create: bool = False) -> str:
        return hmac.new(self._server_secret(create), key.encode(), hashlib.sha256).hexdigest()

    # -- file I/O -----------------------------------------------------------------------
    def _reload_if_changed(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._audit_changes(self._records, {})
            self._records, self._stamp, self._loaded = {}, None, True
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            records = {r["id"]: KeyRecord.model_validate(r) for r in data.get("keys", [])}
        except (OSError, ValueError) as exc:
            # A half-written file (another process mid-save) keeps the previous keys.
            if self._stamp is None:
                raise ConfigError(
                    f"cannot read key store {self.path}: {exc}", hint="fix or delete the file"
                ) from None
            return
        if self._loaded:  # the first read is the server's start, not a reload
            self._audit_changes(self._records, records)
        self._records, self._stamp, self._loaded = records, stamp, True

    def _audit_changes(self, old: dict[str, KeyRecord], new: dict[str, KeyRecord]) -> None:
        if self.audit is None:
            return
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        both = old.keys() & new.keys()
        revoked = sorted(k for k in both if new[k].revoked and not old[k].revoked)
        changed = sorted(k for k in both if new[k] != old[k] and k not in revoked)
        if added or removed or revoked or changed:
            self.audit.write(
                "config.reload", actor="server", what="key_store", path=str(self.path),
                added=added, revoked=revoked, changed=changed, removed=removed, keys=len(new),
            )  # fmt: skip

    def _save(self) -> None:
        # Atomic replace: the server never reads a half-written store.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = {"version": 1, "keys": [r.model_dump() for r in self._records.values()]}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._stamp = None

    # -- management ---------------------------------------------------------------------
    def create(
        self,
        scope: str = "infer",
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        expires_in_s: float | None = None,
        note: str = "",
    ) -> tuple[str, KeyRecord]:
        """Make a key; return it (shown once) and its stored record."""
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}", hint=f"use one of {', '.join(SCOPES)}")
        with self._lock:
            self._reload_if_changed()
            key_id = secrets.token_hex(6)
            key = f"mk_{key_id}_{secrets.token_urlsafe(32)}"
            now = time.time()
            record = KeyRecord(
                id=key_id,
                hash=self._hash(key, create=True),
                scope=scope,
                models=list(models or []),
                rpm=rpm,
                tpm=tpm,
                created=now,
                expires=now + expires_in_s if expires_in_s else None,
                note=note,
            )
            self._records[key_id] = record
            self._save()
        return key, record

    def list(self) -> list[KeyRecord]:
        """Every record, oldest first."""
        with self._lock:
            self._reload_if_changed()
            return sorted(self._records.values(), key=lambda r: r.created)

    def _get(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            raise ConfigError(
                f"no key with id {key_id!r} in {self.path}", hint="'kiln keys list' shows the ids"
            )
        return record

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark a key revoked (the record stays, for the audit trail)."""
        with self._lock:
            self._reload_if_changed()
            record = self._get(key_id).model_copy(update={"revoked": True})
            self._records[key_id] = record
            self._save()
        return record

    def rotate(self, key_id: str) -> tuple[str, KeyRecord]:
        """Revoke a key and make a new one with the same policy and remaining lifetime."""
        with self._lock:
            self._reload_if_changed()
            old = self._get(key_id)
        left = old.expires - time.time() if old.expires else None
        if left is not None and left <= 0:
            raise SecurityError(f"key {key_id} has expired", hint="create a new key instead")
        key, record = self.create(old.scope, old.models, old.rpm, old.tpm, left, old.note)
        self.revoke(key_id)
        return key, record

    # -- checking -----------------------------------------------------------------------
    def authenticate(self, key: str) -> Principal:
        """The principal of a presented key.

        Raises:
            SecurityError: the key is malformed, unknown, wrong, revoked or expired
                (the message says which, never echoing the secret).
        """
        match = _KEY_RE.match(key)
        if not match:
            raise SecurityError("malformed API key", hint="keys look like mk_<id>_<secret>")
        with self._lock:
            self._reload_if_changed()
            record = self._records.get(match.group(1))
        # Hash even for unknown ids, so timing does not reveal which ids exist.
        candidate = self._hash(key) if self._secret or record else ""
        expected = record.hash if record else "0" * 64
        if not hmac.compare_digest(candidate, expected) or record is None:
            raise SecurityError("invalid API key")
        if record.revoked:
            raise SecurityError(f"API key {record.id} has been revoked")
        if record.expires is not None and record.expires < time.time():
            raise SecurityError(f"API key {record.id} has expired")
        return record.principal()
