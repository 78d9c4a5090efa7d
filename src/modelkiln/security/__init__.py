"""Security: scoped API keys with rate and token limits, JWT / OIDC, a tamper-evident audit
log, signed and encrypted artifacts, and the pickle guard.

Modules (heavy dependencies are imported inside functions):

- :mod:`~modelkiln.security.keys` — key store (HMAC-hashed, re-read on change), principals.
- :mod:`~modelkiln.security.ratelimit` — rpm / tpm token buckets, in-process or Redis.
- :mod:`~modelkiln.security.jwt_auth` — HS256 / RS256 / ES256 bearer JWTs, JWKS cache.
- :mod:`~modelkiln.security.audit` — the hash-chained audit log (re-exported from
  :mod:`modelkiln.contract.audit`, where the server and rollout reach it too).
- :mod:`~modelkiln.security.signing` — OpenSSF ``model_signing`` sign / verify, trust policy
  (:mod:`~modelkiln.security.signing_ed25519`: Ed25519 keys, which the library lacks).
- :mod:`~modelkiln.security.encryption` — AES-GCM weights and ONNX graphs, decrypted in memory.
- :mod:`~modelkiln.security.pickles` — pickle checkpoints refused or allowlist-scanned.
- :mod:`~modelkiln.security.serving` — the server plug-in (authenticator, guard, observer).
- :mod:`~modelkiln.security.extension` — the `kiln serve` flags of the plug-in.
"""

from __future__ import annotations

from modelkiln.security.audit import AuditLog, verify_audit_log
from modelkiln.security.keys import KeyRecord, KeyStore, Principal, parse_duration

__all__ = ["AuditLog", "KeyRecord", "KeyStore", "Principal", "parse_duration", "verify_audit_log"]
