"""The ``serve`` pipeline stage's run: serve the run's model for real and load-test it (wiring).

It composes two packages — the server (:mod:`modelkiln.serve`) and the load
generator (:mod:`modelkiln.bench`) — so it lives here, in the wiring layer,
and neither package imports the other. Picks the model
(:func:`~modelkiln.serve.stage.choose_model`), starts the real HTTP server
(uvicorn on a free loopback port, in a background thread of this process),
waits for ``/ready``, drives streaming ``/v1/completions`` (closed loop at
``concurrency``, then an open-loop Poisson run when ``rate`` is set), drains
and stops the server, and records throughput, TTFT / TPOT / ITL percentiles,
goodput and errors (stage layout: :mod:`modelkiln.serve.stage`).

Example:
    >>> ctx = StageContext(pipeline=cfg, config=ServeStageConfig(requests=16), out=out,
    ...                    inputs={"train": train_artifact}, metrics={})
    >>> run_serve_stage(ctx); ctx.metrics["closed"]["output_tokens_per_s"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from modelkiln.contract import REPORT_MD, REQUESTS_JSON, SERVE_JSON
from modelkiln.errors import ServingError, StageError
from modelkiln.serve.stage import ServeStageConfig, choose_model, stage_prompts, stage_report

if TYPE_CHECKING:
    from modelkiln.bench import LoadReport, RequestResult
    from modelkiln.stages import StageContext


def run_serve_stage(ctx: StageContext) -> None:
    """Pipeline entry point: serve, load-test, drain, record metrics and ``report.md``.

    Raises:
        StageError: no model to serve, or the server did not start.
    """
    from modelkiln.bench import SLO, run_load
    from modelkiln.serve import ModelServer, ModelSpec, ServeConfig
    from modelkiln.serve.config import GenerationConfig

    cfg = ctx.config
    assert isinstance(cfg, ServeStageConfig)
    choice = choose_model(ctx.inputs)
    name = "model"
    serve_cfg = ServeConfig(
        models=[
            ModelSpec(
                path=choice.path,
                name=name,
                adapter=choice.adapter,
                kind="causal_lm",
                backend=choice.backend,
            )
        ],
        port=cfg.port,
        threads=cfg.threads,
        generation=GenerationConfig(max_num_seqs=cfg.max_num_seqs),
        drain_timeout_s=10.0,
    )
    prompts = stage_prompts(cfg)
    slo = SLO(cfg.slo_ttft_ms / 1000, cfg.slo_tpot_ms / 1000)
    server = ModelServer(config=serve_cfg)
    t0 = time.monotonic()
    try:
        url = server.start(timeout=cfg.startup_timeout_s)
    except ServingError as exc:
        raise StageError(f"the server did not start: {exc}", hint=exc.hint) from exc
    ready_s = time.monotonic() - t0
    reports: dict[str, LoadReport] = {}
    try:
        common: dict[str, Any] = {
            "model": name,
            "max_tokens": cfg.max_tokens,
            "seed": ctx.pipeline.seed,
        }
        with _bar(ctx, f"serve: closed loop x{cfg.concurrency}", cfg.requests) as tick:
            reports["closed"] = run_load(url, prompts, concurrency=cfg.concurrency,
                                         num_requests=cfg.requests, duration_s=cfg.duration_s,
                                         on_result=tick, **common)  # fmt: skip
        if cfg.rate is not None:
            with _bar(ctx, f"serve: open loop {cfg.rate:g} req/s", cfg.requests) as tick:
                reports["open"] = run_load(url, prompts, rate=cfg.rate,
                                           num_requests=cfg.requests, duration_s=cfg.duration_s,
                                           on_result=tick, **common)  # fmt: skip
    finally:
        t1 = time.monotonic()
        server.stop()
        drain_s = time.monotonic() - t1
    runs = {k: r.summary(slo) for k, r in reports.items()}
    ctx.metrics.update(
        {
            "served_path": str(choice.path),
            "served_source": choice.source,
            "served_variant": choice.variant,
            "served_backend": choice.backend,
            "note": choice.note,
            "ready_s": round(ready_s, 3),
            "drain_s": round(drain_s, 3),
            "errors": sum(s["errors"] for s in runs.values()),
            **runs,
        }
    )
    (ctx.out / SERVE_JSON).write_text(
        json.dumps({"server": serve_cfg.model_dump(mode="json"), "runs": runs}, indent=2),
        encoding="utf-8",
    )
    per_request = {k: [asdict(x) for x in r.results] for k, r in reports.items()}
    (ctx.out / REQUESTS_JSON).write_text(json.dumps(per_request), encoding="utf-8")
    (ctx.out / REPORT_MD).write_text(stage_report(choice, cfg, runs), encoding="utf-8")


@contextmanager
def _bar(ctx: StageContext, task: str, total: int) -> Iterator[Callable[[RequestResult], None]]:
    """A progress task advanced once per completed request (the load test's bar)."""
    ctx.progress.start(task, total)
    try:
        yield lambda _result: ctx.progress.advance(task)
    finally:
        ctx.progress.finish(task)
