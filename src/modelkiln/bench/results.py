"""Per-request results and their summary: TTFT / TPOT / ITL / E2E, service vs response time.

Times of one request (seconds, relative to the run's start):

- ``scheduled``: when the load shape wanted it sent (open loop; ``None`` in a closed loop);
- ``dispatched``: when the generator got round to it (``dispatched - scheduled`` is the
  client's own send lag, its overhead);
- ``start``: when its bytes were written on a connection (after any client-side
  concurrency limit let it through).

``latency`` and ``ttft`` run from ``start``: the *service time*. The *response time*
runs from ``scheduled``: it adds the time the request waited for the client, so a
server that falls behind shows up in it (no coordinated omission).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelkiln.stats import percentile_or_none as percentile  # the one shared percentile

__all__ = ["SLO", "LoadReport", "RequestResult", "percentile"]


@dataclass
class RequestResult:
    """What one request did (``latency``/``ttft``/``itl`` in seconds from its send)."""

    start: float
    status: int = 0
    latency: float = 0.0
    ttft: float | None = None
    completion_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    scheduled: float | None = None
    dispatched: float | None = None

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

    @property
    def wait(self) -> float:
        """Seconds between the scheduled and the actual send (0 in a closed loop)."""
        return 0.0 if self.scheduled is None else max(self.start - self.scheduled, 0.0)

    @property
    def send_lag(self) -> float | None:
        """Seconds the generator itself was late dispatching (client overhead)."""
        if self.scheduled is None or self.dispatched is None:
            return None
        return max(self.dispatched - self.scheduled, 0.0)

    @property
    def response(self) -> float:
        """End-to-end seconds from the scheduled send (= ``latency`` in a closed loop)."""
        return self.wait + self.latency

    @property
    def ttft_response(self) -> float | None:
        """Time to first token from the scheduled send."""
        return None if self.ttft is None else self.wait + self.ttft


@dataclass(frozen=True)
class SLO:
    """Per-request service-level objective a request must meet to count towards goodput.

    Bounds apply to the response time (from the scheduled send); ``e2e_s`` is optional.
    """

    ttft_s: float = 1.0
    tpot_s: float = 0.2
    e2e_s: float | None = None
    itl_s: float | None = None

    def met(self, r: RequestResult) -> bool:
        """Whether ``r`` succeeded within every bound (TPOT only checked when defined)."""
        ttft = r.ttft_response
        if not r.ok:
            return False
        if ttft is None:  # not measured (unstreamed): meets no finite TTFT bound
            if self.ttft_s != float("inf"):
                return False
        elif ttft > self.ttft_s:
            return False
        if self.e2e_s is not None and r.response > self.e2e_s:
            return False
        if self.itl_s is not None and r.itl and max(r.itl) > self.itl_s:
            return False
        return r.tpot is None or r.tpot <= self.tpot_s


def series(results: list[RequestResult]) -> dict[str, list[float]]:
    """The per-request metric series (seconds) of the successful requests, by name."""
    ok = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [x for r in ok for x in r.itl],
        "latency": [r.latency for r in ok],
        "response": [r.response for r in ok],
        "ttft_response": [t for r in ok if (t := r.ttft_response) is not None],
        "wait": [r.wait for r in ok],
        "send_lag": [x for r in results if (x := r.send_lag) is not None],
    }


@dataclass
class LoadReport:
    """Every request of one load run, plus how the run was driven and what the client cost."""

    mode: str
    duration_s: float
    results: list[RequestResult]
    client_cpu_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, slo: SLO | None = None) -> dict[str, Any]:
        """Counts, throughput, p50/p95/p99 of every series in ms, goodput under ``slo``.

        ``latency_*`` / ``ttft_*`` are service times (from the actual send);
        ``response_*`` / ``ttft_response_*`` run from the scheduled send. ``None``
        where nothing was measured.
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
        for name, values in series(self.results).items():
            for q in (50, 95, 99):
                p = percentile(values, q)
                out[f"{name}_p{q}_ms"] = None if p is None else p * 1000
        out["e2e_p99_ms"] = out["response_p99_ms"]
        if self.client_cpu_s is not None:
            out["client_cpu_s"] = round(self.client_cpu_s, 4)
            out["client_cpu_util"] = self.client_cpu_s / wall
            out["client_cpu_per_request_ms"] = 1000 * self.client_cpu_s / max(len(self.results), 1)
        if slo is not None:
            good = sum(slo.met(r) for r in self.results)
            out["slo_ttft_ms"] = slo.ttft_s * 1000
            out["slo_tpot_ms"] = slo.tpot_s * 1000
            out["goodput_rps"] = good / wall
            out["slo_attainment"] = good / len(self.results) if self.results else None
        first = next((r.error for r in self.results if not r.ok), None)
        if first is not None:
            out["first_error"] = first[:300]
        out.update(self.meta)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The run with every request, for ``--json`` (reloadable by :meth:`from_dict`)."""
        return {
            "mode": self.mode,
            "duration_s": self.duration_s,
            "client_cpu_s": self.client_cpu_s,
            "meta": self.meta,
            "results": [r.__dict__ for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadReport:
        """Inverse of :meth:`to_dict`."""
        results = [RequestResult(**r) for r in data.get("results", [])]
        return cls(data["mode"], data["duration_s"], results, data.get("client_cpu_s"),
                   dict(data.get("meta") or {}))  # fmt: skip
