"""The tamper-evident audit log (re-exported: it lives in :mod:`modelkiln.contract.audit` so
that the server and the rollout controller can audit without importing this package).

Example:
    >>> log = AuditLog("audit.jsonl")
    >>> log.write("key.create", key_id="3f2a9c01b7de", scope="infer")
    >>> verify_audit_log("audit.jsonl").ok
    True
"""

from __future__ import annotations

from modelkiln.contract.audit import (
    EVENTS,
    GENESIS,
    AuditLog,
    AuditReport,
    AuditWriter,
    verify_audit_log,
)

__all__ = ["EVENTS", "GENESIS", "AuditLog", "AuditReport", "AuditWriter", "verify_audit_log"]
