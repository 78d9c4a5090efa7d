"""The client: keep-alive HTTP/1.1 to any OpenAI-compatible server, parsed as bytes arrive.

Streams ``/v1/completions`` and ``/v1/chat/completions`` (SSE,
``stream_options.include_usage``) or posts ``/v1/embeddings``; each SSE event is
handled when its bytes are read, so TTFT and ITL are stamped then.

Hand-written rather than httpx: keep-alive connections whose responses httptools
(C) parses in the read callback cost about 45 µs of CPU per streamed token, a
quarter of httpx's streaming path, on the cores the client shares with the server
it measures. A request takes one connection of a pool of ``max_connections``; it
times out after ``timeout_s`` without a response byte.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import httptools

from modelkiln.bench.results import RequestResult
from modelkiln.errors import ConfigError, ServingError

__all__ = ["Check", "Client", "check_url", "list_models"]

#: What a 200 answer's body must hold to count as ok: ``"embedding"`` (an embeddings
#: answer: a bytes search for an ``"embedding":`` key, no parse), ``"choices"`` (a
#: non-streamed completion: the small body is parsed and its usage read), or ``None``
#: (not checked; SSE answers are checked event by event).
Check = Literal["embedding", "choices"] | None
_EMBEDDING = re.compile(rb'"embedding"\s*:\s*[\["]')  # a list of floats, or base64
_TAIL = 64  # bytes kept from the previous body piece, so a key cut in two is still found


class _Stale(Exception):
    """A reused keep-alive connection closed before answering (the server timed it out)."""


class _Exchange:
    """One request's response, filled in by its connection's parser callbacks.

    A completions body is split into server-sent events as it arrives; each event
    is handled at once, so TTFT and ITL are stamped when its bytes were read.
    """

    def __init__(
        self, result: RequestResult, t0: float, sse: bool, timeout_s: float, check: Check = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.result = result
        self.t0 = t0
        self.sse = sse
        self.check = None if sse else check
        self.found = False  # the check passed
        self.head = b""  # the start of a checked body, for the error message
        self.tail = b""  # "embedding": the end of the body so far (a key may be cut in two)
        self.kept = bytearray()  # "choices": the whole body (parsed at the end)
        self.done: asyncio.Future[bool] = loop.create_future()  # True: reuse the connection
        self.started = False  # a response byte arrived
        self.framed = False  # Content-Length or chunked (else the body ends with the connection)
        self.ended = False  # [DONE] or an error event came: the rest of the body is ignored
        self.pending = b""  # the start of an event whose end has not arrived yet
        self.error_body = bytearray()
        self.last: float | None = None  # when the previous chunk with text arrived
        self.last_io = loop.time()
        self.timeout_s = timeout_s
        self.timer = loop.call_at(self.last_io + timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per timeout period, re-armed here, rather than one per network read.
        loop = asyncio.get_running_loop()
        if loop.time() - self.last_io >= self.timeout_s:
            self.fail(TimeoutError(f"no response data for {self.timeout_s:g} s"))
        else:
            self.timer = loop.call_at(self.last_io + self.timeout_s, self._check_idle)

    def finish(self, keep_alive: bool) -> None:
        """The response is complete."""
        self.timer.cancel()
        if self.result.status != 200:
            self.result.error = self.error_body.decode("utf-8", "replace")[:300]
        elif self.check is not None:
            self._verify()
        if not self.done.done():
            self.done.set_result(keep_alive)

    def fail(self, exc: BaseException) -> None:
        """The exchange failed (its connection is not reused)."""
        self.timer.cancel()
        if not self.done.done():
            self.done.set_exception(exc)

    def body(self, data: bytes) -> None:
        """The next piece of the response body (chunked framing already removed)."""
        if self.result.status != 200:
            if len(self.error_body) < 4096:
                self.error_body += data
            return
        if self.check is not None:
            self._scan(data)
            return
        if not self.sse or self.ended:
            return
        buf = self.pending + data if self.pending else data
        if b"\r" in buf:  # SSE allows CRLF line ends: split on LF only
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.pending = buf.split(b"\n\n")
        for event in events:
            if not self.ended:
                self._event(event)

    def _scan(self, data: bytes) -> None:
        """Keep what the body check needs of the next 200 body piece (cheap: no parse)."""
        if len(self.head) < 200:
            self.head += data[: 200 - len(self.head)]
        if self.check == "choices":
            self.kept += data
        elif not self.found:
            buf = self.tail + data
            self.found = _EMBEDDING.search(buf) is not None
            self.tail = buf[-_TAIL:]

    def _verify(self) -> None:
        """A 200 answer ended: an error unless its body holds what ``check`` asks for."""
        result = self.result
        shown = self.head.decode("utf-8", "replace")
        if self.check == "embedding":
            if not self.found:
                result.error = f'HTTP 200 without an "embedding" in the body: {shown[:160]!r}'
            return
        try:
            answer = json.loads(self.kept)
            choices = answer["choices"]
        except (ValueError, KeyError, TypeError):
            choices = None
        if not choices or not isinstance(choices, list):
            result.error = f"HTTP 200 without a completion (no choices): {shown[:160]!r}"
            return
        usage = answer.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            result.completion_tokens = usage["completion_tokens"]

    def _event(self, event: bytes) -> None:
        if event.startswith(b"data: ") and b"\n" not in event:
            payload = event[6:]  # the usual one-line event
        else:
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return  # a comment, or an event without data
            payload = b"\n".join(x[1:] if x.startswith(b" ") else x for x in lines)
        if payload == b"[DONE]":
            self.ended = True
            return
        chunk = json.loads(payload)
        result = self.result
        if "error" in chunk:
            result.error = json.dumps(chunk["error"])[:300]
            self.ended = True
            return
        if chunk.get("usage"):
            result.completion_tokens = int(chunk["usage"]["completion_tokens"])
        if any(c.get("text") or (c.get("delta") or {}).get("content")
               for c in chunk.get("choices", [])):  # fmt: skip
            now = time.perf_counter() - self.t0
            if result.ttft is None:
                result.ttft = now
            elif self.last is not None:
                result.itl.append(now - self.last)
            self.last = now


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; httptools parses responses as bytes arrive.

    Hand-written rather than httpx: httpx's streaming path (anyio streams, h11,
    line iteration, a task switch per chunk) cost ~190 µs of CPU per streamed
    token, on the same cores as the server it measures. Here one network read is
    one callback: httptools (C) removes the chunked framing and the events are
    handled in place.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.used = False  # answered a request already (so it may have gone stale since)

    def send(self, request: bytes, exchange: _Exchange) -> None:
        """Write ``request``; ``exchange`` receives the response."""
        assert self.transport is not None
        self.exchange = exchange
        self.transport.write(request)

    def close(self) -> None:
        """Close the connection (a pending exchange fails)."""
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        """Feed the parser (its callbacks below fill in the exchange)."""
        ex = self.exchange
        if ex is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        ex.started = True
        ex.last_io = asyncio.get_running_loop().time()
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # boundary: a bad response fails its request, not the run
            ex.fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """End the pending exchange: stale, complete (unframed body) or failed."""
        self.closed = True
        ex, self.exchange = self.exchange, None
        if ex is None or ex.done.done():
            return
        if not ex.started and self.used:
            ex.fail(_Stale())
        elif ex.result.status and not ex.framed:
            ex.finish(keep_alive=False)  # the body ran until the server closed
        else:
            ex.fail(exc or ConnectionError("the server closed the connection mid-response"))

    # ---------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        """Note whether the body is framed."""
        if self.exchange is not None and name.lower() in (b"content-length", b"transfer-encoding"):
            self.exchange.framed = True

    def on_headers_complete(self) -> None:
        """The status is known."""
        if self.exchange is not None:
            self.exchange.result.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        """Hand the body on."""
        if self.exchange is not None:
            self.exchange.body(body)

    def on_message_complete(self) -> None:
        """The response ended: the connection is free again."""
        ex, self.exchange = self.exchange, None
        self.used = True
        if ex is not None:
            ex.finish(self.parser.should_keep_alive())


class Client:
    """Keep-alive connections to one server, at most ``max_connections`` at a time."""

    def __init__(
        self, url: str, api_key: str | None, timeout_s: float, max_connections: int
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"not an http(s) URL: {url!r}", hint="e.g. http://127.0.0.1:8000")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.headers = (f"Host: {parts.netloc}\r\nUser-Agent: modelkiln-bench\r\n"
                        f"Content-Type: application/json\r\n{auth}")  # fmt: skip
        self.timeout_s = timeout_s
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30.0):
            _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        return conn

    async def post(
        self, route: str, body: dict[str, Any], result: RequestResult, origin: float,
        check: Check = None,
    ) -> float:  # fmt: skip
        """POST ``body`` as JSON to ``route`` and fill ``result`` (SSE when ``stream`` is set).

        ``result.start`` is set once a connection slot is free (``origin`` is the run's
        start); returns that send time (``perf_counter``) for the caller's latency.
        ``check``: what a non-streamed 200 body must hold (else ``result.error`` says so).
        """
        data = json.dumps(body).encode()
        request = (f"POST {self.prefix}{route} HTTP/1.1\r\n{self.headers}"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data  # fmt: skip
        async with self.slots:
            t0 = time.perf_counter()
            result.start = t0 - origin
            while True:
                conn = self.idle.pop() if self.idle else await self._connect()
                if conn.closed:
                    continue
                exchange = _Exchange(result, t0, bool(body.get("stream")), self.timeout_s, check)
                conn.send(request, exchange)
                try:
                    keep = await exchange.done
                except _Stale:
                    continue  # the server dropped it while idle: retry on another connection
                except BaseException:
                    exchange.timer.cancel()
                    conn.close()
                    raise
                if keep and not conn.closed:
                    self.idle.append(conn)
                else:
                    conn.close()
                return t0

    def close(self) -> None:
        """Close the idle connections."""
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def check_url(url: str) -> None:
    """Raise :class:`ConfigError` unless ``url`` is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {url!r}", hint="e.g. http://127.0.0.1:8000")


def list_models(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids of ``GET {url}/v1/models``: proves the server is OpenAI-compatible.

    Raises:
        ServingError: the server is unreachable, or does not answer like an OpenAI API.
    """
    import urllib.error
    import urllib.request

    check_url(url)
    route = url.rstrip("/") + "/v1/models"
    req = urllib.request.Request(route, headers={"User-Agent": "modelkiln-bench"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    not_openai = (
        "check the URL points at an OpenAI-compatible server (vLLM, llama-server, kiln serve)"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # nosec B310: check_url allows http(s) only
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        raise ServingError(
            f"{route} answered HTTP {exc.code}: not an OpenAI-compatible server", hint=not_openai
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServingError(
            f"cannot reach {url}: {reason}", hint="start the server, or check host and port"
        ) from exc
    try:
        data = json.loads(raw)
        ids = [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServingError(
            f"{route} did not return an OpenAI model list ({raw[:80]!r})", hint=not_openai
        ) from exc
    if not ids:
        raise ServingError(f"{route} lists no models", hint="pass --model NAME")
    return ids
