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
dependency here, and they do not report TTFT/TPOT for this API offline.

Example:
    >>> report = run_load("http://127.0.0.1:8000", ["def f(x):"], model="lm",
    ...                   concurrency=4, num_requests=32, max_tokens=64)
    >>> report.summary(SLO(ttft_s=1.0, tpot_s=0.1))["goodput_rps"]
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

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


async def _completion(client: Any, body: dict[str, Any], result: RequestResult, t0: float) -> None:
    last: float | None = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            result.error = (await resp.aread()).decode("utf-8", "replace")[:300]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = json.dumps(chunk["error"])[:300]
                return
            if chunk.get("usage"):
                result.completion_tokens = int(chunk["usage"]["completion_tokens"])
            if any(c.get("text") for c in chunk.get("choices", [])):
                now = time.perf_counter() - t0
                if result.ttft is None:
                    result.ttft = now
                elif last is not None:
                    result.itl.append(now - last)
                last = now


async def _embedding(client: Any, body: dict[str, Any], result: RequestResult) -> None:
    resp = await client.post("/v1/embeddings", json=body)
    result.status = resp.status_code
    if resp.status_code != 200:
        result.error = resp.text[:300]


async def _one(client: Any, kind: Kind, body: dict[str, Any], started: float) -> RequestResult:
    t0 = time.perf_counter()
    result = RequestResult(start=t0 - started)
    try:
        if kind == "completions":
            await _completion(client, body, result, t0)
        else:
            await _embedding(client, body, result)
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
    import httpx

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
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    conns = concurrency if concurrency is not None else 1024
    client = httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
    )
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
    async with client:
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
    return LoadReport(mode, time.perf_counter() - started, results)


def run_load(url: str, prompts: list[str], **kwargs: Any) -> LoadReport:
    """Blocking :func:`run_load_async` (its own event loop; call it off any running loop)."""
    return asyncio.run(run_load_async(url, prompts, **kwargs))
