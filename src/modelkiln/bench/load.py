"""Drive an OpenAI-compatible server with a load shape and collect every request's result.

Closed loop (``concurrency=N``), open loop (``rate=R`` with ``arrival`` constant /
Poisson / gamma) or trace replay (``trace=[TraceRequest, ...]``). In the open
modes every request has a scheduled send time and its response time is measured
from it: when ``max_concurrency`` (or the connection pool) holds requests back,
the wait counts, as it does for a user (coordinated omission, vLLM#54101).

A prompt may name its own model (``("lm.v2", "def f(x):")``: requests alternate
between models over one set of connections), ``until`` stops a run early (its
requests in flight are still awaited), and ``stream=False`` sends completions
unstreamed (latency only, no TTFT).

Example:
    >>> report = run_load("http://127.0.0.1:8000", ["def f(x):"], model="lm",
    ...                   rate=4.0, num_requests=64, max_concurrency=8)
    >>> report.summary(SLO(ttft_s=1.0, tpot_s=0.1))["response_p99_ms"]
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from modelkiln.bench.backends.openai import Check, Client
from modelkiln.bench.profiles.concurrent import ClosedLoop
from modelkiln.bench.profiles.rate import OpenLoop
from modelkiln.bench.profiles.replay import TraceRequest
from modelkiln.bench.results import LoadReport, RequestResult
from modelkiln.errors import ConfigError

Kind = Literal["completions", "chat", "embeddings"]
KINDS: tuple[str, ...] = ("completions", "chat", "embeddings")
_ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions",
           "embeddings": "/v1/embeddings"}  # fmt: skip
#: Open-loop connection pool when no ``max_concurrency`` is given.
OPEN_POOL = 1024
#: The longest the open loop sleeps between two looks at ``until``.
UNTIL_POLL_S = 0.05
#: A prompt, or a ``(model, prompt)`` pair: that request goes to that model.
Prompt = str | tuple[str, str]


def request_body(
    kind: str, model: str | None, prompt: str, max_tokens: int, stream: bool = True
) -> dict[str, Any]:
    """The JSON body of one request of ``kind`` (completions and chat streamed unless
    ``stream`` is False)."""
    body: dict[str, Any]
    sampling: dict[str, Any] = {"temperature": 0.0, "stream": stream}
    if stream:
        sampling["stream_options"] = {"include_usage": True}
    if kind == "completions":
        body = {"prompt": prompt, "max_tokens": max_tokens, **sampling}
    elif kind == "chat":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                **sampling}  # fmt: skip
    else:
        body = {"input": prompt}
    if model is not None:
        body["model"] = model
    return body


def _body_check(kind: str, body: dict[str, Any]) -> Check:
    """What a 200 answer to ``body`` must hold (SSE answers are checked event by event)."""
    if kind == "embeddings":
        return "embedding"
    return None if body.get("stream") else "choices"


async def _one(
    client: Client, kind: str, body: dict[str, Any], origin: float, result: RequestResult,
    on_result: Callable[[RequestResult], None] | None = None,
) -> RequestResult:  # fmt: skip
    t0: float | None = None
    try:
        t0 = await client.post(_ROUTES[kind], body, result, origin, _body_check(kind, body))
    except Exception as exc:  # boundary: a failed request is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    send = t0 if t0 is not None else origin + result.start
    result.latency = time.perf_counter() - send
    if kind == "embeddings" and result.ok:
        result.ttft = result.latency
    if on_result is not None:
        on_result(result)
    return result


def _check(
    prompts: Sequence[Prompt], concurrency: int | None, rate: float | None, trace: Any,
    num_requests: int | None, duration_s: float | None, until: Callable[[], bool] | None,
) -> None:  # fmt: skip
    if sum(x is not None for x in (concurrency, rate, trace)) != 1:
        raise ConfigError(
            "give exactly one of concurrency (closed loop), rate (open loop) and trace",
            hint="e.g. concurrency=8, or rate=2.0 requests per second",
        )
    if trace is None and num_requests is None and duration_s is None and until is None:
        raise ConfigError("give num_requests or duration_s (or until)", hint="e.g. num_requests=64")
    if trace is None and not prompts:
        raise ConfigError("no prompts to send", hint="pass at least one prompt")
    bad = next((p for p in prompts if not isinstance(p, str) and
                not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p))),
               None)  # fmt: skip
    if bad is not None:
        raise ConfigError(
            f"a prompt must be a string or a (model, prompt) pair of strings, got {bad!r}",
            hint='e.g. ["def f(", ("lm.v2", "def g(")]',
        )


def _plan(
    prompts: Sequence[Prompt], max_tokens: int, offsets: Iterator[float] | None,
    trace: list[TraceRequest] | None,
) -> Iterator[tuple[float | None, Prompt, int]]:  # fmt: skip
    """(scheduled offset or None, prompt, max_tokens) of every request, endless unless a trace."""
    if trace is not None:
        yield from ((t.offset_s, t.prompt, t.max_tokens) for t in trace)
        return
    i = 0
    while True:
        yield (
            (next(offsets) if offsets is not None else None),
            prompts[i % len(prompts)],
            max_tokens,
        )
        i += 1


async def run_load_async(
    url: str,
    prompts: Sequence[Prompt],
    *,
    kind: Kind | str = "completions",
    model: str | None = None,
    max_tokens: int = 64,
    concurrency: int | None = None,
    rate: float | None = None,
    arrival: str = "poisson",
    burstiness: float = 1.0,
    trace: list[TraceRequest] | None = None,
    max_concurrency: int | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    api_key: str | None = None,
    timeout_s: float = 300.0,
    extra_body: dict[str, Any] | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    until: Callable[[], bool] | None = None,
    stream: bool = True,
) -> LoadReport:
    """Drive ``url`` with ``prompts`` (cycled) and return every request's result.

    Give exactly one of ``concurrency`` (closed loop), ``rate`` (open loop) or
    ``trace`` (replay), and for the first two at least one of ``num_requests`` /
    ``duration_s`` / ``until`` (whichever comes first ends the sending; requests in
    flight are still awaited). ``until`` is called before each request is sent (and
    every ``UNTIL_POLL_S`` while the open loop waits): once it returns True no more
    are sent, those in flight are awaited (each bounded by ``timeout_s``), and the
    report is the usual one, with ``meta["stopped_early"]``. It runs on the loop's
    thread: pass ``asyncio.Event().is_set``, or ``threading.Event().is_set`` to stop
    a blocking :func:`run_load` from another thread.

    A prompt is a string (sent to ``model``) or a ``(model, prompt)`` pair (sent to
    that model), so one run can alternate between models over the same connections.
    ``stream=False`` sends completions / chat unstreamed: latency only (no TTFT, ITL
    or TPOT), output tokens from the answer's usage. A 200 answer without a body of
    its kind (no ``"embedding"`` key, no ``choices``) counts as an error.
    ``max_concurrency`` caps requests in flight in the open modes: the rest wait on
    the client, and that wait is part of their response time. ``on_result`` is called
    with each request's result as it completes (a progress bar). The report's
    ``client_cpu_s`` is this process's CPU time over the run: the client's alone only
    when the server runs in another process.

    Raises:
        ConfigError: the arguments do not describe a run.
    """
    _check(prompts, concurrency, rate, trace, num_requests, duration_s, until)
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}", hint=f"one of {', '.join(KINDS)}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}", hint="e.g. 8")
    closed = ClosedLoop(concurrency) if concurrency is not None else None
    opened = OpenLoop(rate, arrival, burstiness, seed) if rate is not None else None
    pool = concurrency or max_concurrency or OPEN_POOL
    client = Client(url, api_key, timeout_s, pool)
    offsets = opened.offsets() if opened is not None else None
    plan = _plan(prompts, max_tokens, offsets, trace)
    limit = num_requests if num_requests is not None else 1 << 62
    cpu0 = time.process_time()
    started = time.perf_counter()
    stop_at = started + duration_s if duration_s is not None else float("inf")
    sent = 0
    stopped = False

    def halted() -> bool:
        nonlocal stopped
        stopped = stopped or (until is not None and bool(until()))
        return stopped

    def next_request() -> tuple[float | None, dict[str, Any]] | None:
        nonlocal sent
        if halted():
            return None
        item = next(plan, None)
        if item is None or sent >= limit or time.perf_counter() >= stop_at:
            return None
        sent += 1
        name, prompt = item[1] if isinstance(item[1], tuple) else (model, item[1])
        body = request_body(kind, name, prompt, item[2], stream) | (extra_body or {})
        return item[0], body

    try:
        if closed is not None:
            results = await _closed_loop(
                client, kind, next_request, started, closed.concurrency, on_result
            )
            mode = closed.mode
        else:
            results = await _open_loop(
                client, kind, next_request, started, stop_at, on_result,
                halted if until is not None else None,
            )  # fmt: skip
            mode = (
                opened.mode if opened is not None else f"trace replay, {len(trace or [])} requests"
            )
    finally:
        client.close()
    wall = time.perf_counter() - started
    meta: dict[str, Any] = {"max_concurrency": max_concurrency} if max_concurrency else {}
    if stopped:
        meta["stopped_early"] = True
    return LoadReport(mode, wall, results, time.process_time() - cpu0, meta)


async def _closed_loop(
    client: Client, kind: str, next_request: Any, started: float, concurrency: int,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:  # fmt: skip
    """``concurrency`` workers, each sending its next request when the last one ended."""
    results: list[RequestResult] = []

    async def worker() -> None:
        while (req := next_request()) is not None:
            r = RequestResult(start=time.perf_counter() - started)
            results.append(await _one(client, kind, req[1], started, r, on_result))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _open_loop(
    client: Client, kind: str, next_request: Any, started: float, stop_at: float,
    on_result: Callable[[RequestResult], None] | None = None,
    halted: Callable[[], bool] | None = None,
) -> list[RequestResult]:  # fmt: skip
    """Send each request at its scheduled offset; the wait for a slot counts.

    With ``halted``, the wait for a request's send time is cut in ``UNTIL_POLL_S``
    steps, so a stop is seen within one of them (the request is then not sent).
    """
    tasks = []
    while (req := next_request()) is not None:
        offset, body = req
        due = started + offset
        if due >= stop_at:
            break
        delay = due - time.perf_counter()
        while delay > 0:
            if halted is None:
                await asyncio.sleep(delay)
                break
            await asyncio.sleep(min(delay, UNTIL_POLL_S))
            if halted():
                break
            delay = due - time.perf_counter()
        if halted is not None and halted():
            break
        now = time.perf_counter() - started
        r = RequestResult(start=now, scheduled=offset, dispatched=now)
        tasks.append(asyncio.create_task(_one(client, kind, body, started, r, on_result)))
    return list(await asyncio.gather(*tasks))


def run_load(url: str, prompts: Sequence[Prompt], **kwargs: Any) -> LoadReport:
    """Blocking :func:`run_load_async` (its own event loop; call it off any running loop).

    To stop it early from another thread: ``until=threading_event.is_set``.
    """
    return asyncio.run(run_load_async(url, prompts, **kwargs))
