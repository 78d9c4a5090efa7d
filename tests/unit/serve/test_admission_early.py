"""The early 429: refused from the headers alone, before the body is parsed or tokenized."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from http_helpers import FakeEngine, client, config, metric, run

from modelkiln.contract.serving import RequestRecord, ServeHooks
from modelkiln.serve import create_app
from modelkiln.serve.early import HoldGrid

COMPLETION = {"model": "lm", "prompt": "def add", "max_tokens": 20}


def test_a_full_queue_refuses_before_parsing_and_keeps_the_connection() -> None:
    engine = FakeEngine(delay=0.05)

    async def go() -> tuple[httpx.Response, httpx.Response, httpx.Response, str]:
        app = create_app(config(max_queued_requests=1, reject_hold_s=0.2), engines={"lm": engine})
        async with client(app) as c:
            busy = asyncio.create_task(c.post("/v1/completions", json=COMPLETION))
            while not engine.requests:
                await asyncio.sleep(0.005)
            # Not even JSON: had it been parsed, the answer would be a 400/422.
            garbage = await c.post("/v1/completions", content=b"{not json" * 1000)
            other_route = await c.post("/v1/embeddings", content=b"{not json")
            ok = await busy
            return garbage, other_route, ok, (await c.get("/metrics")).text

    garbage, other_route, ok, text = run(go())
    assert garbage.status_code == 429, garbage.text
    assert garbage.json()["error"]["code"] == "queue_full"
    assert int(garbage.headers["retry-after"]) >= 1
    assert "connection" not in garbage.headers  # the body was drained: kept alive
    assert other_route.status_code != 429  # no encoder is served: the route answers itself
    assert ok.status_code == 200
    assert len(engine.requests) == 1
    assert metric(text, "ml_rejections_total", reason="queue_requests") == 1
    assert metric(text, "ml_requests_total", model_name="lm", status="429") == 1


class Records:
    """Observer keeping every record."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def observe(self, record: RequestRecord) -> None:
        self.records.append(record)


def test_the_door_lets_auth_refuse_first_and_keeps_metrics_and_records() -> None:
    engine = FakeEngine(delay=0.05)
    seen = Records()
    key = {"Authorization": "Bearer k"}

    async def go() -> tuple[list[httpx.Response], str, float]:
        cfg = config(max_queued_requests=1, reject_hold_s=0.3, api_keys=["k"])
        app = create_app(cfg, engines={"lm": engine}, hooks=ServeHooks(observers=[seen]))
        async with client(app) as c:
            busy = asyncio.create_task(c.post("/v1/completions", json=COMPLETION, headers=key))
            while not engine.requests:
                await asyncio.sleep(0.005)
            no_key = await c.post("/v1/completions", content=b"{not json")
            t0 = time.perf_counter()
            refused = await c.post("/v1/completions", content=b"{not json", headers=key)
            held = time.perf_counter() - t0
            out = [no_key, refused, await busy]
            assert app.state.kiln.observers.flush(10)
            return out, (await c.get("/metrics", headers=key)).text, held

    (no_key, refused, ok), text, held = run(go())
    assert no_key.status_code == 401  # not a 429: the caller is unknown
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert "queue_requests" in refused.json()["error"]["message"]
    assert held >= 0.3  # held (the hold timer), not answered at once
    assert ok.status_code == 200
    assert metric(text, "ml_requests_total", model_name="lm", status="429") == 1
    assert metric(text, "ml_rejections_total", reason="queue_requests") == 1
    statuses = sorted((r.status, r.principal) for r in seen.records if r.route != "/metrics")
    assert (429, "api-key") in statuses and (200, "api-key") in statuses


def test_held_answers_share_one_timer_per_grid_slot() -> None:
    async def go() -> tuple[list[float], float, int, int]:
        grid = HoldGrid(step=0.2)
        loop = asyncio.get_running_loop()
        woke: list[float] = []
        start = loop.time()

        async def hold(seconds: float) -> None:
            await grid.sleep(seconds)
            woke.append(loop.time())

        timers = 0
        call_at = loop.call_at

        def counted(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            nonlocal timers
            timers += 1
            return call_at(when, callback, *args)

        loop.call_at = counted  # type: ignore[method-assign,assignment]
        tasks = [asyncio.create_task(hold(0.25 + i * 0.001)) for i in range(50)]
        await asyncio.sleep(0)
        loop.call_at = call_at  # type: ignore[method-assign]
        tasks[0].cancel()  # a client gone: only its own wait ends
        await asyncio.gather(*tasks, return_exceptions=True)
        return woke, start, timers, grid.pending()

    woke, start, timers, pending = run(go())
    assert len(woke) == 49 and pending == 0
    assert timers <= 2  # 50 holds ending within 50 ms: one or two slots, not 50 timers
    assert min(woke) - start >= 0.25 - 1e-3  # never shorter than asked
    assert max(woke) - start <= 0.25 + 0.049 + 0.2 + 0.05  # at most one slot later


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_no_hold_returns_at_once(seconds: float) -> None:
    async def go() -> int:
        grid = HoldGrid()
        await grid.sleep(seconds)
        return grid.pending()

    assert run(go()) == 0
