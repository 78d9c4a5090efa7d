"""``kiln bench serve``: one benchmark of a running OpenAI-compatible server.

Checks the server first (``GET /v1/models``: reachable, OpenAI-shaped, picks the
first model when none is named), then runs the chosen load shape and returns a
JSON-ready result: the summary, the SLO verdict, and every request (``--json``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelkiln.bench.backends.openai import list_models
from modelkiln.bench.load import run_load
from modelkiln.bench.profiles.goodput import search_rate
from modelkiln.bench.profiles.replay import load_trace
from modelkiln.bench.profiles.sweep import sweep
from modelkiln.bench.results import LoadReport
from modelkiln.bench.slo import parse_slo
from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError
from modelkiln.progress import QUIET, Progress

DEFAULT_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    'def read_json(path):\n    """Load a JSON file."""\n',
)


class ServeBenchConfig(KilnModel):
    """What ``kiln bench serve`` runs."""

    url: str = Field(description="Server base URL, e.g. http://127.0.0.1:8000.")
    kind: Literal["completions", "chat", "embeddings"] = Field(
        "completions", description="API to drive."
    )
    model: str | None = Field(None, description="Model name; default: first of /v1/models.")
    concurrency: int | None = Field(None, ge=1, description="Closed loop: concurrent clients.")
    rate: float | None = Field(None, gt=0, description="Open loop: requests per second.")
    arrival: Literal["constant", "poisson", "gamma"] = Field(
        "poisson", description="Open-loop arrival process."
    )
    burstiness: float = Field(1.0, gt=0, description="Gamma shape (1 = Poisson).")
    trace: Path | None = Field(None, description="JSONL trace to replay.")
    speedup: float = Field(1.0, gt=0, description="Trace replay time divisor.")
    sweep: bool = Field(False, description="Double the rate until the server saturates.")
    search: bool = Field(False, description="Find the highest rate that meets --slo.")
    slo: str | None = Field(None, description="e.g. ttft_p95=500ms,tpot_p95=50ms.")
    max_concurrency: int | None = Field(None, ge=1, description="Open loop: cap in flight.")
    requests: int | None = Field(None, ge=1, description="Requests per run.")
    duration_s: float | None = Field(None, gt=0, description="Seconds of sending per run.")
    max_tokens: int = Field(64, ge=1, description="Output tokens per request.")
    stream: bool = Field(True, description="Stream completions (False: latency only, no TTFT).")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS),
                               description="Prompts, cycled.")  # fmt: skip
    seed: int = Field(0, description="Arrival seed.")
    api_key: str | None = Field(None, description="Bearer token.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request idle timeout.")


def _check_mode(cfg: ServeBenchConfig) -> str:
    modes = {"closed": cfg.concurrency is not None and not (cfg.sweep or cfg.search),
             "open": cfg.rate is not None and not (cfg.sweep or cfg.search),
             "replay": cfg.trace is not None, "sweep": cfg.sweep, "search": cfg.search}  # fmt: skip
    chosen = [m for m, on in modes.items() if on]
    if len(chosen) != 1 or (cfg.concurrency is not None and cfg.rate is not None):
        raise ConfigError(
            "choose one mode: --concurrency N, --rate R, --trace FILE, --sweep or --search",
            hint="e.g. kiln bench serve URL --rate 4 --requests 200",
        )
    if chosen[0] == "search" and not cfg.slo:
        raise ConfigError("--search needs --slo", hint="e.g. --slo ttft_p95=500ms,tpot_p95=50ms")
    if not cfg.stream and cfg.slo and re.search(r"(ttft|tpot|itl)_p", cfg.slo.lower()):
        raise ConfigError(
            "--no-stream measures latency only: an SLO on ttft, tpot or itl cannot be judged",
            hint="bound the response time instead, e.g. --slo e2e_p95=2s",
        )
    if chosen[0] != "replay" and cfg.requests is None and cfg.duration_s is None:
        raise ConfigError("give --requests N or --duration S", hint="e.g. --requests 200")
    return chosen[0]


def run_serve_bench(cfg: ServeBenchConfig, progress: Progress = QUIET) -> dict[str, Any]:
    """Run the benchmark ``cfg`` describes and return its JSON-ready result.

    ``progress`` gets one bar per load run (a sweep or search step is one run),
    advanced as each request completes.

    Raises:
        ConfigError: the options do not describe one run, or a bad SLO / trace.
        ServingError: the server is unreachable or not OpenAI-compatible.
    """
    mode = _check_mode(cfg)
    spec = parse_slo(cfg.slo) if cfg.slo else None
    trace = load_trace(cfg.trace, cfg.speedup, cfg.max_tokens) if cfg.trace else None
    models = list_models(cfg.url, cfg.api_key)
    model = cfg.model or models[0]
    common: dict[str, Any] = {
        "kind": cfg.kind, "model": model, "max_tokens": cfg.max_tokens, "seed": cfg.seed,
        "api_key": cfg.api_key, "timeout_s": cfg.timeout_s, "num_requests": cfg.requests,
        "duration_s": cfg.duration_s, "max_concurrency": cfg.max_concurrency,
        "stream": cfg.stream,
    }  # fmt: skip

    def load(task: str, **options: Any) -> LoadReport:
        progress.start(task, cfg.requests or (len(trace) if trace else None))
        try:
            return run_load(cfg.url, cfg.prompts, on_result=lambda _r: progress.advance(task),
                            **options, **common)  # fmt: skip
        finally:
            progress.finish(task)

    def at_rate(rate: float) -> LoadReport:
        return load(f"bench: {rate:g} req/s", rate=rate, arrival=cfg.arrival,
                    burstiness=cfg.burstiness)  # fmt: skip

    per_request = spec.per_request() if spec else None
    out: dict[str, Any] = {"url": cfg.url, "model": model, "kind": cfg.kind, "mode": mode}
    if mode == "sweep":
        res = sweep(at_rate, cfg.rate or 1.0)
        out |= {"steps": res.steps, "saturated_at_rps": res.saturated_at,
                "max_throughput_rps": res.max_throughput_rps}  # fmt: skip
        return out
    if mode == "search":
        assert spec is not None
        found = search_rate(at_rate, spec, cfg.rate or 1.0)
        out |= {"best_rate_rps": found.best_rate, "ci_rps": [found.ci_low, found.ci_high],
                "probes": found.probes, "slo": cfg.slo}  # fmt: skip
        return out
    if mode == "closed":
        report = load(f"bench: {cfg.concurrency} clients", concurrency=cfg.concurrency)
    elif mode == "replay":
        common.pop("num_requests")
        report = load("bench: trace replay", trace=trace)
    else:
        report = at_rate(cfg.rate or 1.0)
    out["summary"] = report.summary(per_request)
    if spec is not None:
        out["slo"] = {"spec": cfg.slo, "met": spec.met(report), "targets": spec.evaluate(report)}
    out["run"] = report.to_dict()
    return out


def make_config(**options: Any) -> ServeBenchConfig:
    """Build a :class:`ServeBenchConfig`, turning a validation failure into one ConfigError."""
    from pydantic import ValidationError

    try:
        return ServeBenchConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(
            f"bad option {where}={err.get('input')!r}: {err['msg']}",
            hint="see kiln bench serve --help",
        ) from None
