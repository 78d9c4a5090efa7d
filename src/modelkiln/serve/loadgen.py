"""Load generator for OpenAI-compatible servers: closed loop or open-loop Poisson arrivals.

Streams ``/v1/completions`` (SSE, ``stream_options.include_usage``) or posts
``/v1/embeddings`` and measures, per request: time to first token (TTFT), time
per output token after the first (TPOT), inter-token latencies (ITL, between
SSE chunks carrying text), end-to-end latency and the status. A
:class:`LoadReport` turns them into p50/p95/p99, throughput and goodput
(requests per second that met an :class:`SLO`).

- closed loop (``concurrency=N``): N clients each send their next request when
  the previous one finished; measures capacity at a fixed concurrency.
- open loop (``rate=R``): requests arrive as a Poisson process of R per second
  (exponential gaps from ``random.Random(seed)``) whatever the server does, so
  queueing shows up in the latencies, as it does for real traffic.

Hand-written (not locust / vegeta / vLLM's benchmark script): none of those is a
dependency here, and they do not report TTFT/TPOT for this API offline. The HTTP
client is hand-written too: keep-alive HTTP/1.1 connections whose responses
httptools parses as the bytes arrive, so the generator costs little CPU on the
cores it shares with the server it measures (about 45 µs per streamed token, a
quarter of what httpx took). A request takes one connection of a pool of
``concurrency`` (open loop: up to 1024); it times out after ``timeout_s`` without
a response byte.

Example:
    >>> report = run_load("http://127.0.0.1:8000", ["def f(x):"], model="lm",
    ...                   concurrency=4, num_requests=32, max_tokens=64)
    >>> report.summary(SLO(ttft_s=1.0, tpot_s=0.1))["goodput_rps"]
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import httptools

from modelkiln.errors import ConfigError

Kind = Literal["completions", "embeddings"]


@dataclass
class RequestResult:
    """What one request did (times in seconds, relative to its own start)."""

    start: float
    status: int = 0
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """HTTP 200 and no error event in the stream."""
        return self.status == 200 and self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than 2 tokens)."""
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Service-level objective a request must meet to count towards goodput."""

    ttft_s: float = 1.0
    tpot_s: float = 0.2

    def met(self, r: RequestResult) -> bool:
        """Whether ``r`` succeeded within both bounds (TPOT only checked when defined)."""
        if not r.ok or r.ttft is None or r.ttft > self.ttft_s:
            return False
        return r.tpot is None or r.tpot <= self.tpot_s


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100, linear interpolation); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LoadReport:
    """Every request of one load run, plus how the run was driven."""

    mode: str
    duration_s: float
    results: list[RequestResult]

    def summary(self, slo: SLO | None = None) -> dict[str, Any]:
        """Counts, throughput, p50/p95/p99 of TTFT / TPOT / ITL / latency, goodput under ``slo``.

        Latencies are in milliseconds; ``None`` where nothing was measured.
        """
        ok = [r for r in self.results if r.ok]
        wall = max(self.duration_s, 1e-9)
        tokens = sum(r.completion_tokens for r in ok)
        out: dict[str, Any] = {
            "mode": self.mode,
            "requests": len(self.results),
            "ok": len(ok),
            "errors": len(self.results) - len(ok),
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": len(ok) / wall,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall,
        }
        series = {
            "ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [t for r in ok if (t := r.tpot) is not None],
            "itl": [x for r in ok for x in r.itl],
            "latency": [r.latency for r in ok],
        }
        for name, values in series.items():
            for q in (50, 95, 99):
                p = percentile(values, q)
                out[f"{name}_p{q}_ms"] = None if p is None else p * 1000
        if slo is not None:
            good = sum(slo.met(r) for r in self.results)
            out["slo_ttft_ms"] = slo.ttft_s * 1000
            out["slo_tpot_ms"] = slo.tpot_s * 1000
            out["goodput_rps"] = good / wall
            out["slo_attainment"] = good / len(self.results) if self.results else None
        first = next((r.error for r in self.results if not r.ok), None)
        if first is not None:
            out["first_error"] = first[:300]
        return out


class _Stale(Exception):
    """A reused keep-alive connection closed before answering (the server timed it out)."""


class _Exchange:
    """One request's response, filled in by its connection's parser callbacks.

    A completions body is split into server-sent events as it arrives; each event
    is handled at once, so TTFT and ITL are stamped when its bytes were read.
    """

    def __init__(self, result: RequestResult, t0: float, sse: bool, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.result = result
        self.t0 = t0
        self.sse = sse
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
        if not self.sse or self.ended:
            return
        buf = self.pending + data if self.pending else data
        if b"\r" in buf:  # SSE allows CRLF line ends: split on LF only
            buf = buf.replace(b"\r\n", b"\n")
        *events, self.pending = buf.split(b"\n\n")
        for event in events:
            if not self.ended:
                self._event(event)

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
        if any(c.get("text") for c in chunk.get("choices", [])):
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


class _Client:
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
        self.headers = (f"Host: {parts.netloc}\r\nUser-Agent: modelkiln-loadgen\r\n"
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
        self, route: str, body: dict[str, Any], result: RequestResult, t0: float
    ) -> None:
        """POST ``body`` as JSON to ``route`` and fill ``result`` (SSE when ``stream`` is set)."""
        data = json.dumps(body).encode()
        request = (f"POST {self.prefix}{route} HTTP/1.1\r\n{self.headers}"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data  # fmt: skip
        async with self.slots:
            while True:
                conn = self.idle.pop() if self.idle else await self._connect()
                if conn.closed:
                    continue
                exchange = _Exchange(result, t0, bool(body.get("stream")), self.timeout_s)
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
                return

    def close(self) -> None:
        """Close the idle connections."""
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _one(client: _Client, kind: Kind, body: dict[str, Any], started: float) -> RequestResult:
    t0 = time.perf_counter()
    result = RequestResult(start=t0 - started)
    try:
        await client.post(f"/v1/{kind}", body, result, t0)
    except Exception as exc:  # boundary: a failed request is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - t0
    if kind == "embeddings" and result.ok:
        result.ttft = result.latency
    return result


def _body(kind: Kind, model: str | None, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any]
    if kind == "completions":
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
    else:
        body = {"input": prompt}
    if model is not None:
        body["model"] = model
    return body


async def run_load_async(
    url: str,
    prompts: list[str],
    *,
    kind: Kind = "completions",
    model: str | None = None,
    max_tokens: int = 64,
    concurrency: int | None = None,
    rate: float | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    api_key: str | None = None,
    timeout_s: float = 300.0,
    extra_body: dict[str, Any] | None = None,
) -> LoadReport:
    """Drive ``url`` with ``prompts`` (cycled) and return every request's result.

    Give exactly one of ``concurrency`` (closed loop) or ``rate`` (open loop, requests
    per second), and at least one of ``num_requests`` / ``duration_s`` (whichever
    comes first ends the sending; requests in flight are still awaited).

    Raises:
        ConfigError: the arguments do not describe a run.
    """
    if (concurrency is None) == (rate is None):
        raise ConfigError(
            "give exactly one of concurrency (closed loop) and rate (open loop)",
            hint="e.g. concurrency=8, or rate=2.0 requests per second",
        )
    if num_requests is None and duration_s is None:
        raise ConfigError("give num_requests or duration_s", hint="e.g. num_requests=64")
    if not prompts:
        raise ConfigError("no prompts to send", hint="pass at least one prompt")
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}", hint="e.g. 8")
    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be > 0 requests/s, got {rate}", hint="e.g. 2.0")
    limit = num_requests if num_requests is not None else 1 << 62
    client = _Client(url, api_key, timeout_s, concurrency if concurrency is not None else 1024)
    counter = iter(range(limit))
    started = time.perf_counter()
    stop_at = started + duration_s if duration_s is not None else float("inf")

    def next_body() -> dict[str, Any] | None:
        i = next(counter, None)
        if i is None or time.perf_counter() >= stop_at:
            return None
        body = _body(kind, model, prompts[i % len(prompts)], max_tokens)
        return body | (extra_body or {})

    results: list[RequestResult] = []
    try:
        if concurrency is not None:

            async def worker() -> None:
                while (body := next_body()) is not None:
                    results.append(await _one(client, kind, body, started))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            mode = f"closed loop, concurrency {concurrency}"
        else:
            assert rate is not None
            rng = random.Random(seed)
            tasks = []
            due = started
            while True:
                due += rng.expovariate(rate)
                delay = due - time.perf_counter()
                if due >= stop_at:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                body = next_body()
                if body is None:
                    break
                tasks.append(asyncio.create_task(_one(client, kind, body, started)))
            results = list(await asyncio.gather(*tasks))
            mode = f"open loop, Poisson {rate:g} req/s"
    finally:
        client.close()
    return LoadReport(mode, time.perf_counter() - started, results)


def run_load(url: str, prompts: list[str], **kwargs: Any) -> LoadReport:
    """Blocking :func:`run_load_async` (its own event loop; call it off any running loop)."""
    return asyncio.run(run_load_async(url, prompts, **kwargs))
