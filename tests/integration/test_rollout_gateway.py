"""Rollouts against a real server on loopback: three registry versions of a tiny GPT-2
behind the rollout gateway, real HTTP load, the controller on the real clock.

- a canary of v2 that passes ends with 100 % on v2 (and v2 in production);
- a faulty v3 (50 % injected errors) rolls back by itself, and the log says why;
- a blue-green switch under streaming load drops nothing;
- an automatic rollback of a slow v4 under streaming load drops nothing either.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, wait_ready
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.registry import Registry
from modelkiln.rollout.serving import build_gateway, registry_versions

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer adm"}
FAST = {"steps": [50, 100], "dwell_s": 3, "check_interval_s": 1, "min_requests": 5}
BODY = {"model": "tiny", "prompt": "def add(", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Registry, Path]]:
    import uvicorn

    pytest.importorskip("modelkiln.serve.generation.engine")
    tmp = tmp_path_factory.mktemp("rollout")
    src = save_tiny_gpt2(tmp / "src")
    reg = Registry(tmp / "reg")
    for _ in range(4):  # the same weights: only the injected faults tell v3 / v4 apart
        reg.add("tiny", src)
    shutil.rmtree(src)
    reg.promote("tiny", 1, "production")
    folders, serving = registry_versions(reg, "tiny", ["1", "2", "3", "4"])
    gw = build_gateway(
        "tiny", folders, serving=serving, state_dir=tmp / "state", admin_keys=["adm"],
        registry=reg, model_options={"backend": "torch", "precision": "fp32"},
        serve_config={"max_queue_wait_s": 60},  # a loaded CI box must not shed streams (429)
        plugins=True,  # what kiln rollout serve plugs in: the monitor's /v1/monitor
        faults={"3": FaultInjector(FaultSpec(error_rate=0.5), seed=0),
                "4": FaultInjector(FaultSpec(extra_latency_ms=300), seed=0)}, tick_s=0.2,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120)
    yield url, reg, tmp / "state"
    server.should_exit = True
    thread.join(30)


def _status(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/admin/rollout/tiny", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _load_until_done(url: str, deadline_s: float) -> dict[str, int]:
    """Send completions until the rollout is no longer running (bounded)."""
    seen: dict[str, int] = {}
    end = time.monotonic() + deadline_s
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            for _ in range(5):
                r = client.post("/v1/completions", json=BODY)
                seen[f"{r.headers.get('x-model-version')}:{r.status_code}"] = (
                    seen.get(f"{r.headers.get('x-model-version')}:{r.status_code}", 0) + 1
                )
            if (_status(url)["rollout"] or {}).get("status") != "running":
                break
    return seen


def _start(url: str, body: dict[str, Any]) -> None:
    r = httpx.post(url + "/admin/rollout/tiny/start", json=body, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text


def test_canary_that_passes_promotes_v2(gateway: tuple[str, Registry, Path]) -> None:
    url, reg, _ = gateway
    assert httpx.post(url + "/admin/rollout/tiny/start", json={"candidate": "2"}).status_code == 401
    _start(url, {"candidate": "2", "strategy": "canary", "canary": FAST})
    seen = _load_until_done(url, 120)
    view = _status(url)
    assert view["rollout"]["status"] == "promoted", view
    assert view["policy"]["weights"] == {"2": 100}
    assert seen.get("2:200", 0) > 0 and not any(k.endswith(":500") for k in seen)
    assert reg.show("tiny", "production").version == 2
    models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    assert [m["split"] for m in models if m["id"] == "tiny"] == [{"2": 100}]
    monitor = httpx.get(url + "/v1/monitor", timeout=10).json()  # read by the drift gate
    assert {m["model"] for m in monitor["models"]} >= {"tiny.v1", "tiny.v2"}
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'kiln_rollout_requests_total{model_name="tiny",status="200",version="2"}' in metrics


def test_faulty_v3_rolls_back_and_logs_why(gateway: tuple[str, Registry, Path]) -> None:
    url, reg, state = gateway
    _start(url, {"candidate": "3", "strategy": "canary", "canary": FAST | {"dwell_s": 60}})
    dup = httpx.post(url + "/admin/rollout/tiny/start", json={"candidate": "1"}, headers=ADMIN)
    assert dup.status_code == 409 and "already running" in dup.text
    _load_until_done(url, 120)
    view = _status(url)
    assert view["rollout"]["status"] == "rolled-back", view
    assert view["policy"]["weights"] == {"2": 100}
    last = json.loads((state / "tiny.decisions.jsonl").read_text().splitlines()[-1])
    assert last["action"] == "rollback" and "errors log-LR" in last["reason"]
    assert reg.show("tiny", "production").version == 2  # the registry is untouched
    key = ["--url", url, "--admin-key", "adm"]
    cli = CliRunner().invoke(app, ["rollout", "status", "tiny", "--json", *key])
    assert cli.exit_code == 0 and json.loads(cli.stdout)["rollout"]["status"] == "rolled-back"
    again = CliRunner().invoke(
        app, ["rollout", "abort", "tiny", "--url", url, "--admin-key", "adm"]
    )
    assert again.exit_code == 2 and "no active rollout" in again.stderr


def _stream(
    url: str, results: list[str], stop: threading.Event, spans: list[tuple[str, float, float]]
) -> None:
    """Stream completions until ``stop``; note each stream's version, outcome and span."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            body = BODY | {"stream": True, "max_tokens": 16}
            t0 = time.monotonic()
            try:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    lines = [ln for ln in r.iter_lines() if ln]
                ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                version = r.headers.get("x-model-version") or "?"
                results.append(f"{version}:{'ok' if ok else r.status_code}")
                spans.append((version, t0, time.monotonic()))
            except httpx.HTTPError as exc:
                results.append(f"error:{exc!r}")


def test_blue_green_switch_under_streaming_load_drops_nothing(
    gateway: tuple[str, Registry, Path],
) -> None:
    url, _, _ = gateway
    results: list[str] = []
    stop = threading.Event()
    spans: list[tuple[str, float, float]] = []
    clients = [threading.Thread(target=_stream, args=(url, results, stop, spans)) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        _start(url, {"candidate": "1", "strategy": "blue-green", "shadow_percent": 100,
                     "canary": FAST | {"dwell_s": 2}})  # fmt: skip
        end = time.monotonic() + 120
        while time.monotonic() < end and _status(url)["rollout"]["status"] == "running":
            time.sleep(0.3)
        time.sleep(1.0)  # streams started before the end finish on their version
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    view = _status(url)
    assert view["rollout"]["status"] == "promoted", view["decisions"][-3:]
    assert results and all(r.endswith(":ok") for r in results), [
        r for r in results if not r.endswith(":ok")
    ]
    assert {r.split(":")[0] for r in results} == {"1", "2"}  # streams on both sides of the switch


def test_automatic_rollback_under_streaming_load_drops_nothing(
    gateway: tuple[str, Registry, Path],
) -> None:
    """A v4 that answers 300 ms late rolls back by itself while 4 clients stream; every
    stream, the ones on v4 in flight at the rollback included, ends with [DONE]."""
    url, reg, state = gateway
    baseline = str(reg.show("tiny", "production").version)
    results: list[str] = []
    spans: list[tuple[str, float, float]] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_stream, args=(url, results, stop, spans)) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        _start(url, {"candidate": "4", "strategy": "canary", "canary": FAST | {"dwell_s": 600}})
        end = time.monotonic() + 120
        while time.monotonic() < end and _status(url)["rollout"]["status"] == "running":
            time.sleep(0.3)
        time.sleep(1.0)  # streams started before the rollback finish on v4
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    view = _status(url)
    assert view["rollout"]["status"] == "rolled-back", view["decisions"][-3:]
    assert view["policy"]["weights"] == {baseline: 100}
    last = json.loads((state / "tiny.decisions.jsonl").read_text().splitlines()[-1])
    assert last["action"] == "rollback" and "latency" in last["reason"]
    assert results and all(r.endswith(":ok") for r in results), [
        r for r in results if not r.endswith(":ok")
    ]
    assert "4" in {r.split(":")[0] for r in results}  # streams ran on v4 before the rollback
