"""The early 429: refused from the headers alone, before the body is parsed or tokenized."""

from __future__ import annotations

import asyncio

import httpx
from http_helpers import FakeEngine, client, config, metric, run

from modelkiln.serve import create_app

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
