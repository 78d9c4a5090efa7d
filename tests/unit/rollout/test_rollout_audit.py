"""Rollout decisions and operator actions reach the hash-chained audit log (issue 15)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
from test_controller import Harness, spec

from modelkiln.contract.audit import AuditLog, verify_audit_log
from modelkiln.rollout.controller import Controller
from modelkiln.rollout.gateway import RolloutGateway
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.state import StateStore
from modelkiln.serve.clock import FakeClock


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_decisions_and_actions_are_audited(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    h = Harness(tmp_path / "state")
    with AuditLog(path) as audit:
        h.ctl.audit = audit
        with h.ctl.acting("cli"):
            h.ctl.start(spec(candidate="3"))
        h.run(120, bad="3")
    events = [e for e in lines(path) if e["event"] != "checkpoint"]
    assert events[0]["event"] == "rollout.action" and events[0]["actor"] == "cli"
    assert events[0]["action"] == "start" and events[0]["version"] == "3"
    last = events[-1]
    assert last["event"] == "rollout.decision" and last["actor"] == "controller"
    assert last["action"] == "rollback" and "log-LR" in str(last["reason"])
    assert last["status"] == "rolled-back" and "log_evidence" in last["numbers"]  # type: ignore[operator]
    assert len(events) == len(h.store.decisions("m"))  # every logged decision is audited
    assert verify_audit_log(path).ok


def test_admin_api_actions_name_the_key_not_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    rec = Recorder()

    async def inner(scope: object, receive: object, send: object) -> None:
        raise AssertionError("no request reaches the model server here")

    def factory(apply: object) -> Controller:
        return Controller(StateStore(tmp_path / "s"), FakeClock(), rec, apply=apply, audit=audit)  # type: ignore[arg-type]

    gw = RolloutGateway(
        inner, versions={"m": ["1", "2"]}, serving={"m": "1"}, controller_factory=factory,
        recorder=rec, admin_keys=["s3cret"], tick_s=3600, on_close=audit.close,
    )  # fmt: skip

    async def go() -> None:
        transport = httpx.ASGITransport(app=gw)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            auth = {"authorization": "Bearer s3cret"}
            r = await c.post("/admin/rollout/m/start", json={"candidate": "2"}, headers=auth)
            assert r.status_code == 200, r.text
            r = await c.post("/admin/rollout/m/abort", json={"reason": "bad"}, headers=auth)
            assert r.status_code == 200, r.text

    asyncio.run(go())
    gw.close()
    text = path.read_text()
    assert "s3cret" not in text
    events = [e for e in lines(path) if e["event"] != "checkpoint"]
    assert [(e["event"], e["action"]) for e in events] == [
        ("rollout.action", "start"), ("rollout.action", "abort"),
    ]  # fmt: skip
    assert str(events[1]["actor"]).startswith("admin-key:") and events[1]["reason"] == "bad"
    assert verify_audit_log(path).ok
