"""Small raw-ASGI helpers of the gateway: read a body, replay it, answer JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    """The whole request body."""
    parts = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts)


def replay(
    body: bytes, receive: Callable[[], Awaitable[dict[str, Any]]]
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` that yields ``body`` once, then waits on the real one (disconnects)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def json_response(
    send: Callable[[dict[str, Any]], Awaitable[None]], status: int, obj: Any
) -> None:
    """Send a complete JSON response."""
    body = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def call_app(
    app: Callable[..., Awaitable[None]],
    method: str,
    path: str,
    body: Any = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, bytes]:
    """One in-process HTTP request to an ASGI app (no socket): ``(status, body)``."""
    data = json.dumps(body).encode() if body is not None else b""
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": hdrs + (headers or []),
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }  # fmt: skip
    status, chunks, sent = [500], [], [False]

    async def receive() -> dict[str, Any]:
        if sent[0]:  # the body went; nobody disconnects until the answer is complete
            await asyncio.Event().wait()
        sent[0] = True
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            status[0] = msg["status"]
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await app(scope, receive, send)
    return status[0], b"".join(chunks)
