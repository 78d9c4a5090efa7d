"""The rollout gateway over a fake inner ASGI app: routing, override, shadow, admin, models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelkiln.rollout.controller import Controller
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.gateway import RolloutGateway
from modelkiln.rollout.policy import CanaryConfig
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.spec import RolloutSpec
from modelkiln.rollout.state import StateStore
from modelkiln.serve.clock import FakeClock

ADMIN = {"authorization": "Bearer adm"}


async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A model server double: echoes the served model name as the completion text."""
    if scope["path"] == "/v1/models":
        body = json.dumps({"object": "list", "data": [{"id": "m.v1"}, {"id": "m.v2"}]}).encode()
    elif scope["path"] == "/metrics":
        body = b"ml_ready 1\n"
    else:
        msg = await receive()
        req = json.loads(msg["body"])
        body = json.dumps({"choices": [{"text": "same answer " + req["model"][-2:]}]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def gateway(tmp: Path, clock: FakeClock, **kw: Any) -> RolloutGateway:
    rec = Recorder()

    def factory(apply: Any) -> Controller:
        return Controller(StateStore(tmp), clock, rec, apply=apply)

    return RolloutGateway(
        inner, versions={"m": ["1", "2", "3"]}, serving={"m": "1"}, controller_factory=factory,
        recorder=rec, admin_keys=["adm"], tick_s=3600, **kw,
    )  # fmt: skip


def run(gw: RolloutGateway, coro_fn: Any) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=gw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await coro_fn(client)

    try:
        return asyncio.run(main())
    finally:
        gw.close()


def test_routing_override_and_models(tmp_path: Path) -> None:
    gw = gateway(tmp_path, FakeClock())

    async def go(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 200 and r.headers.get("x-model-version") == "1", r.text
        assert r.json()["choices"][0]["text"].endswith("v1")
        r = await c.post("/v1/completions", json={"model": "m"}, headers={"X-Model-Version": "3"})
        assert r.headers["x-model-version"] == "3"
        r = await c.post("/v1/completions", json={"model": "m"}, headers={"X-Model-Version": "7"})
        assert r.status_code == 400 and "'7' is not a served version" in r.text
        models = (await c.get("/v1/models")).json()["data"]
        [logical] = [m for m in models if m["id"] == "m"]
        assert logical["versions"] == ["1", "2", "3"] and logical["split"] == {"1": 100}
        assert "kiln_rollout_requests_total" in (await c.get("/metrics")).text

    run(gw, go)
    arm = gw.recorder.drain("m", "1")
    assert (arm.requests, arm.errors) == (1, 0)


def test_admin_start_split_shadow_and_auth(tmp_path: Path) -> None:
    clock = FakeClock()
    gw = gateway(tmp_path, clock)

    async def go(c: httpx.AsyncClient) -> None:
        assert (await c.get("/admin/rollout")).status_code == 401
        body = {"candidate": "2", "strategy": "shadow", "shadow_percent": 100}
        r = await c.post("/admin/rollout/m/start", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["policy"]["shadow"] == "2"
        again = await c.post("/admin/rollout/m/start", json=body, headers=ADMIN)
        assert again.status_code == 409 and "already" in again.text
        missing = await c.post("/admin/rollout/m/start", json={"candidate": "9"}, headers=ADMIN)
        assert missing.status_code == 400 and "not loaded" in missing.text
        for t in (0, 0, 0, 0, 0, 1.0):  # a sampled answer (temperature 1) is not compared
            await c.post("/v1/completions", json={"model": "m", "prompt": "x", "temperature": t})
        await asyncio.sleep(0.05)  # the mirrored requests run in the background
        r = await c.post("/admin/rollout/m/abort", json={"reason": "test"}, headers=ADMIN)
        assert r.json()["rollout"]["status"] == "aborted"

    run(gw, go)
    assert gw.recorder.drain("m", "2").requests == 6
    pairs = gw.recorder.drain_pairs("m")
    assert len(pairs) == 5 and all(p == pytest.approx(2 / 3) for p in pairs)


def test_canary_mirrors_each_request_to_the_other_version(tmp_path: Path) -> None:
    gw = gateway(tmp_path, FakeClock())
    canary = {"steps": [10, 100], "dwell_s": 3600}

    async def go(c: httpx.AsyncClient) -> None:
        r = await c.post("/admin/rollout/m/start", json={"candidate": "2", "canary": canary},
                         headers=ADMIN)  # fmt: skip
        assert r.json()["policy"]["mirror_percent"] == 100
        served = [
            (await c.post("/v1/completions", json={"model": "m", "temperature": 0})).headers[
                "x-model-version"
            ]
            for _ in range(40)
        ]
        await asyncio.sleep(0.05)
        assert served.count("2") < 20  # users still see the canary share only

    run(gw, go)
    # ... but both versions ran every request: the candidate is measured on all 40
    assert gw.recorder.drain("m", "2").requests == 40 == gw.recorder.drain("m", "1").requests
    assert gw.recorder.drain_pairs("m") == []  # a canary is meant to answer differently


def test_injected_fault_returns_500_and_is_recorded(tmp_path: Path) -> None:
    faults = {("m", "2"): FaultInjector(FaultSpec(error_rate=1.0))}
    gw = gateway(tmp_path, FakeClock(), faults=faults)

    async def go(c: httpx.AsyncClient) -> None:
        r = await c.post("/v1/completions", json={"model": "m"}, headers={"X-Model-Version": "2"})
        assert r.status_code == 500 and "injected fault" in r.text

    run(gw, go)
    assert gw.recorder.drain("m", "2").errors == 1


def test_canary_body_validated(tmp_path: Path) -> None:
    gw = gateway(tmp_path, FakeClock())

    async def go(c: httpx.AsyncClient) -> None:
        bad = {"candidate": "2", "canary": {"steps": [5, 50]}}
        r = await c.post("/admin/rollout/m/start", json=bad, headers=ADMIN)
        assert r.status_code == 400 and "end at 100" in r.text
        ok = {"candidate": "2", "canary": CanaryConfig(steps=[50, 100]).model_dump()}
        r = await c.post("/admin/rollout/m/start", json=ok, headers=ADMIN)
        assert r.json()["policy"]["weights"] == {"1": 50, "2": 50}

    run(gw, go)


def test_adapter_versions_are_served_on_their_base(tmp_path: Path) -> None:
    from modelkiln.errors import ConfigError
    from modelkiln.rollout.plan import version_fields

    base = tmp_path / "base"
    base.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    assert version_fields(adapter) == {"path": base, "adapter": adapter}
    assert version_fields(base) == {"path": base}
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/x"}))
    with pytest.raises(ConfigError, match="not a local folder"):
        version_fields(adapter)


def test_restart_without_the_candidate_aborts_its_rollout(tmp_path: Path) -> None:
    clock = FakeClock()
    ctl = Controller(StateStore(tmp_path), clock, Recorder())
    ctl.start(RolloutSpec(model="m", baseline="1", candidate="9"))  # 9: added live, then lost
    gw = gateway(tmp_path, clock)  # serves 1, 2, 3
    gw.close()
    state = gw.controller.status("m")
    assert state is not None and state.status == "aborted" and "9 is not loaded" in state.reason
    assert gw.policies["m"].weights == {"1": 100}
