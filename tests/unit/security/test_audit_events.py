"""Admin actions reach the audit log: several writers share one chain, key-store and JWKS
reloads, adapter load / unload records, the server-start settings (no secrets), and the
contract's writer is what ``modelkiln.security`` re-exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkiln.contract.audit import EVENTS, AuditLog, verify_audit_log
from modelkiln.contract.serving import RequestRecord
from modelkiln.security.keys import KeyStore


class Events:
    """An :class:`~modelkiln.contract.audit.AuditWriter` double that keeps what it gets."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.got.append((event, fields))


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_security_reexports_the_contract_writer() -> None:
    import modelkiln.security as sec
    from modelkiln.security import audit

    assert sec.AuditLog is AuditLog and audit.verify_audit_log is verify_audit_log


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    server = AuditLog(path, fsync_interval_s=0, checkpoint_every=5)
    for i in range(12):
        server.write("request", status=200, n=i)
        if i % 3 == 0:  # another process (kiln keys) appends between the server's lines
            with AuditLog(path, fsync_interval_s=0, checkpoint_every=0) as cli:
                cli.write("key.create", actor="cli", key_id=f"k{i}")
    server.close()
    report = verify_audit_log(path)
    assert report.ok, report.problems
    seqs = [e["seq"] for e in _events(path)]
    assert seqs == list(range(len(seqs))) and report.lines == 12 + 4 + report.checkpoints


def test_key_store_reload_is_audited_with_the_changed_ids(tmp_path: Path) -> None:
    served = KeyStore(tmp_path / "keys.json")
    cli = KeyStore(tmp_path / "keys.json")  # the kiln keys process
    key, first = cli.create("infer")
    served.audit = events = Events()
    assert served.authenticate(key).key_id == f"key:{first.id}"
    assert events.got == []  # the first read is the start, not a reload
    _, second = cli.create("embed")
    cli.revoke(first.id)
    served.list()
    (event, fields), *rest = events.got
    assert rest == [] and event == "config.reload"
    assert fields["what"] == "key_store" and fields["keys"] == 2
    assert (fields["added"], fields["revoked"], fields["removed"]) == ([second.id], [first.id], [])
    served.list()
    assert len(events.got) == 1  # unchanged file: no event


def test_jwks_reload_is_audited_when_the_key_set_changes() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from modelkiln.security.jwt_auth import JWKSCache, JWTConfig

    def jwk(kid: str) -> dict[str, Any]:
        key = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), True)
        return dict(key) | {"kid": kid, "alg": "ES256", "use": "sig"}

    sets = [{"keys": [jwk("a")]}, {"keys": [jwk("a")]}, {"keys": [jwk("b")]}]
    cache = JWKSCache(JWTConfig(jwks_url="http://127.0.0.1:9/jwks"), fetch=lambda: sets.pop(0))
    cache.audit = events = Events()
    assert cache.refresh() and cache.refresh() and events.got == []
    assert cache.refresh()
    assert events.got == [
        ("config.reload", {"actor": "server", "what": "jwks", "source": "http://127.0.0.1:9/jwks",
                           "added": ["b"], "removed": ["a"], "keys": 1})
    ]  # fmt: skip


def _admin(method: str, route: str, status: int) -> RequestRecord:
    return RequestRecord(route=route, method=method, status=status, latency_s=0.01, time=0.0,
                         principal="key:abc")  # fmt: skip


def test_adapter_routes_are_named_actions() -> None:
    from modelkiln.security.ratelimit import MemoryLimiter
    from modelkiln.security.serving import PolicyGuard, UsageObserver

    events = Events()
    observer = UsageObserver(PolicyGuard(MemoryLimiter()), events, audit_requests=False)  # type: ignore[arg-type]
    observer.observe(_admin("POST", "/admin/adapters", 201))
    observer.observe(_admin("DELETE", "/admin/adapters/lm:sql", 200))
    observer.observe(_admin("GET", "/admin/adapters", 200))
    observer.observe(_admin("POST", "/v1/completions", 200))  # not audited: audit_requests off
    assert [e for e, _ in events.got] == ["adapter.load", "adapter.unload", "admin"]
    assert events.got[1][1]["adapter"] == "lm:sql" and events.got[0][1]["principal"] == "key:abc"
    assert "input_tokens" not in events.got[0][1]
    assert all(e in EVENTS for e, _ in events.got)


def test_server_start_records_settings_but_no_secret(tmp_path: Path) -> None:
    import argparse

    from modelkiln.security.extension import SecurityExtension
    from modelkiln.serve import ServeConfig

    parser = argparse.ArgumentParser()
    SecurityExtension().add_arguments(parser)
    secret = "s" * 40
    audit = tmp_path / "audit.jsonl"
    args = parser.parse_args(["--audit-log", str(audit), "--jwt-secret", secret,
                              "--audit-fsync", "0"])  # fmt: skip
    cfg = ServeConfig.model_validate({"models": [{"path": "m", "name": "lm"}], "port": 0})
    hooks = SecurityExtension().hooks(args, cfg)
    assert hooks is not None
    for observer in hooks.observers:
        getattr(observer, "close", lambda: None)()
    start, stop = _events(audit)
    assert start["event"] == "server.start" and stop["event"] == "server.stop"
    assert start["models"] == [{"name": "lm", "path": "m", "version": "1"}]
    assert start["jwt"]["hs256"] is True and secret not in audit.read_text()
