"""No dropped connections: an ``httpx`` pool of 64 connections, idle gaps around its 5 s
expiry, and a mix of 200, 404 and 429 answers (early 429s included) -> no transport error.

uvicorn's default keep-alive (5 s) equals httpx's pool expiry (5 s): a request sent on a
pooled connection just as the server closes it fails with ``ReadError`` /
``RemoteProtocolError``. The server keeps connections 75 s (``keep_alive_s``), and its
early 429 drains the unread body so the connection stays usable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from overload_support import text
from serve_support import free_port, start_process, stop_process

from http_helpers import tiny_encoder_dir  # isort: skip

GAPS_S = (5.5, 4.95)  # around httpx's keepalive_expiry (5.0 s)
EXTRA: list[str] = []  # more server flags (to compare: ["--set", "keep_alive_s=5"])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = start_process(
        ["--model-path", str(tiny_encoder_dir()), "--name", "enc", "--precision", "fp32",
         "--set", "cache.enabled=false", "--set", "max_queued_requests=8",
         "--set", "reject_hold_s=0", *EXTRA],
        port,
    )  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


async def _burst(c: httpx.AsyncClient, round_: int) -> tuple[dict[int, int], list[str]]:
    async def one(i: int) -> int | str:
        try:
            if i % 8 == 0:
                r = await c.get("/v1/nothing-here")
            elif i % 8 == 1:
                r = await c.post("/v1/embeddings", json={"model": "nope", "input": "a"})
            else:
                body = {"model": "enc", "input": text(round_ * 1000 + i, 20)}
                r = await c.post("/v1/embeddings", json=body)
            return r.status_code
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc!r}"

    answers = await asyncio.gather(*(one(i) for i in range(96)))
    codes: dict[int, int] = {}
    for a in answers:
        if isinstance(a, int):
            codes[a] = codes.get(a, 0) + 1
    return codes, [a for a in answers if isinstance(a, str)]


def test_pooled_connections_survive_idle_gaps_and_error_answers(server: str) -> None:
    async def go() -> tuple[dict[int, int], list[str]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        seen: dict[int, int] = {}
        errors: list[str] = []
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=60) as c:
            for round_, gap in enumerate((*GAPS_S, 0.0)):
                codes, errs = await _burst(c, round_)
                errors += errs
                for k, v in codes.items():
                    seen[k] = seen.get(k, 0) + v
                await asyncio.sleep(gap)
        return seen, errors

    seen, errors = asyncio.run(go())
    assert errors == [], errors[:5]
    assert set(seen) <= {200, 404, 429}, seen
    assert seen.get(200, 0) > 0 and seen.get(404, 0) > 0 and seen.get(429, 0) > 0, seen
