"""The load generator's HTTP client against scripted loopback servers: chunked SSE split
anywhere, CRLF / multi-line / comment events, error events, non-200 answers in every
framing, keep-alive reuse, stale connections, timeouts, refused connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from http_helpers import run

from modelkiln.bench import LoadReport, RequestResult, run_load_async
from modelkiln.errors import ConfigError

#: Answers the n-th request (0-based) of a connection; returns whether to keep the connection.
Script = Callable[[int, asyncio.StreamWriter], Awaitable[bool]]

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunked(*pieces: bytes) -> bytes:
    """``pieces`` in HTTP/1.1 chunked framing, with the terminating chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def event(payload: dict[str, Any] | str) -> bytes:
    """One SSE event."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def token(text: str) -> bytes:
    """A completion chunk event adding ``text``."""
    return event({"id": "c", "choices": [{"index": 0, "text": text, "finish_reason": None}]})


END = event({"id": "c", "choices": [], "usage": {"completion_tokens": 3}}) + event("[DONE]")


class Scripted:
    """A loopback HTTP server answering with a script; records request heads and connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.connections = 0
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if not await self.script(n, writer):
                    break
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    async def load(self, path: str = "", **kwargs: Any) -> LoadReport:
        """``run_load_async`` against this server (one client, one request by default)."""
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        args: dict[str, Any] = {"model": "lm", "concurrency": 1, "num_requests": 1}
        async with server:
            report = await run_load_async(f"http://127.0.0.1:{port}{path}", ["p"], **args | kwargs)
            await asyncio.wait(self.handlers, timeout=5)  # they end when the client hangs up
        return report


def load(script: Script, **kwargs: Any) -> tuple[list[RequestResult], Scripted]:
    scripted = Scripted(script)
    return run(scripted.load(**kwargs)).results, scripted


async def dribble(writer: asyncio.StreamWriter, data: bytes, size: int) -> None:
    """``data`` in ``size``-byte writes with pauses, so the client reads it in pieces."""
    for i in range(0, len(data), size):
        writer.write(data[i : i + size])
        await writer.drain()
        await asyncio.sleep(0.002)


def test_chunked_events_cut_anywhere_are_timed_once_each_over_one_connection() -> None:
    body = SSE_HEAD + chunked(token("a") + token("b"), token(""), token("c") + END)

    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        await dribble(writer, body, size=7 + n)  # other cut points on every request
        return True

    results, server = load(script, num_requests=3)
    assert server.connections == 1  # keep-alive
    assert server.heads[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
    for r in results:
        assert r.ok and r.status == 200 and r.completion_tokens == 3
        assert r.ttft is not None and len(r.itl) == 2  # a, b, c: the empty chunk is no token
        assert r.tpot is not None and r.latency >= r.ttft


def test_crlf_multiline_and_comment_events_parse() -> None:
    crlf = token("a").replace(b"\n", b"\r\n")
    two_lines = b'data: {"id": "c",\ndata:"choices": [{"index": 0, "text": "b"}]}\n\n'
    body = SSE_HEAD + chunked(b": keep-alive\n\n" + crlf[:-1], crlf[-1:] + two_lines + END)

    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        await dribble(writer, body, size=5)
        return True

    (r,), _ = load(script)
    assert r.ok and r.ttft is not None and len(r.itl) == 1 and r.completion_tokens == 3


def test_an_error_event_fails_the_request_with_its_error() -> None:
    error = {"message": "generation failed: boom", "code": "engine_error"}
    body = SSE_HEAD + chunked(token("a") + event({"error": error}), token("late") + END)

    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        await dribble(writer, body, size=len(body))
        return True

    results, server = load(script, num_requests=2)
    assert server.connections == 1
    for r in results:
        assert r.status == 200 and not r.ok and r.ttft is not None and not r.itl
        assert json.loads(r.error or "") == error


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_non_200_answers_keep_their_status_and_body(framing: str) -> None:
    text = '{"error": {"message": "no model \u00e9", "code": "model_not_found"}}'.encode()
    head = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    answer = {
        "length": head + b"content-length: %d\r\n\r\n%s" % (len(text), text),
        "chunked": head + b"transfer-encoding: chunked\r\n\r\n" + chunked(text[:9], text[9:]),
        "close": head + b"connection: close\r\n\r\n" + text,  # the body ends with the connection
    }[framing]

    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        await dribble(writer, answer, size=16)
        return framing != "close"

    results, server = load(script, num_requests=2)
    assert server.connections == (2 if framing == "close" else 1)
    for r in results:
        assert r.status == 404 and not r.ok and r.ttft is None
        assert r.error == text.decode()


def test_embeddings_with_a_path_prefix_and_an_api_key() -> None:
    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        body = b'{"data": [{"embedding": [0.1]}]}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        return True

    results, server = load(script, kind="embeddings", path="/api/", api_key="k", num_requests=3)
    assert all(r.ok and r.ttft == r.latency for r in results) and len(results) == 3
    assert server.heads[0].startswith(b"POST /api/v1/embeddings HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in server.heads[0]


def test_a_stale_keep_alive_connection_is_replaced() -> None:
    dropped = False

    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        nonlocal dropped
        if n == 1 and not dropped:  # the first connection's second request: hang up on it
            dropped = True
            return False
        writer.write(SSE_HEAD + chunked(token("a") + END))
        return True

    results, server = load(script, num_requests=3)
    assert all(r.ok for r in results) and server.connections == 2
    assert len(server.heads) == 4  # one request was sent twice


def test_a_silent_server_times_out() -> None:
    async def script(n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(SSE_HEAD + b"%x\r\n%s\r\n" % (len(token("a")), token("a")))
        await asyncio.sleep(1.0)
        return False

    (r,), _ = load(script, timeout_s=0.2)
    assert not r.ok and r.ttft is not None and (r.error or "").startswith("TimeoutError")
    assert r.latency < 0.9


def test_refused_connections_are_errors_and_urls_are_checked() -> None:
    async def refused() -> LoadReport:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await run_load_async(f"http://127.0.0.1:{port}", ["x"], concurrency=2,
                                    num_requests=2)  # fmt: skip

    summary = run(refused()).summary()
    assert summary["errors"] == 2 and "Error" in summary["first_error"]
    with pytest.raises(ConfigError, match="http"):
        run(run_load_async("ftp://host", ["x"], concurrency=1, num_requests=1))
