"""The ``serve`` pipeline stage: serve the run's model for real and load-test it.

Picks the model (see :func:`choose_model`), starts the real HTTP server
(uvicorn on a free loopback port, in a background thread of this process),
waits for ``/ready``, drives streaming ``/v1/completions`` with the load
generator (:mod:`modelkiln.bench`: closed loop at ``concurrency``, then
an open-loop Poisson run when ``rate`` is set), drains and stops the server, and
records throughput, TTFT / TPOT / ITL percentiles, goodput and errors.

Stage layout (``out``)::

    report.md     what was served (and why), the load-test table
    serve.json    the ServeConfig used and every summary
    requests.json per-request TTFT / TPOT / latency / status of every run

Example:
    >>> ctx = StageContext(pipeline=cfg, config=ServeStageConfig(requests=16), out=out,
    ...                    inputs={"train": train_artifact}, metrics={})
    >>> run_serve_stage(ctx); ctx.metrics["closed"]["output_tokens_per_s"]
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from modelkiln.configbase import KilnModel
from modelkiln.errors import ServingError, StageError
from modelkiln.optimize.kv_export import KV_ONNX

if TYPE_CHECKING:
    from modelkiln.pipeline import StageContext
    from modelkiln.bench import LoadReport

log = logging.getLogger(__name__)

#: Code stubs sent when ``prompts: builtin``.
BUILTIN_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    'def read_json(path):\n    """Load a JSON file and return its content."""\n',
    "async def fetch_all(urls):\n",
    "def quicksort(items):\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n",
)


class ServeStageConfig(KilnModel):
    """The ``serve`` stage: which server settings to use and how hard to load-test them."""

    port: int = Field(0, ge=0, le=65535, description="Loopback TCP port (0: a free one).")
    requests: int = Field(32, ge=1, description="Requests of the closed-loop load test.")
    duration_s: float | None = Field(
        30.0, gt=0, description="Stop sending after this many seconds (None: send every request)."
    )
    concurrency: int = Field(4, ge=1, description="Concurrent streams of the closed loop.")
    rate: float | None = Field(
        None, gt=0, description="Also run an open loop at this Poisson rate (requests/s)."
    )
    max_tokens: int = Field(32, ge=1, description="Tokens to generate per request.")
    prompts: Literal["builtin", "humaneval"] = Field(
        "builtin", description="Prompts: fixed code stubs, or HumanEval's problem prompts."
    )
    max_num_seqs: int = Field(16, ge=1, description="Sequences the engine decodes together.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads of the server.")
    slo_ttft_ms: float = Field(2000.0, gt=0, description="Goodput SLO: time to first token.")
    slo_tpot_ms: float = Field(250.0, gt=0, description="Goodput SLO: time per output token.")
    startup_timeout_s: float = Field(120.0, gt=0, description="Most seconds to wait for /ready.")


@dataclass(frozen=True)
class Choice:
    """The model the stage serves and why."""

    path: Path
    adapter: Path | None
    source: str  # "optimize" or "train"
    variant: str | None = None
    note: str = ""
    backend: Literal["torch", "onnx"] = "torch"


def _train_model(train_dir: Path) -> tuple[Path, Path | None]:
    model = train_dir / "model"
    if not (model / "config.json").is_file():
        raise StageError(
            f"the train artifact '{train_dir}' holds no model/config.json",
            hint="re-run the train stage",
        )
    adapter = train_dir / "adapter"
    return model, adapter if (adapter / "adapter_config.json").is_file() else None


def choose_model(inputs: dict[str, Any]) -> Choice:
    """The promoted optimize variant when the generation engine can run it, else a torch model.

    The engine runs HF torch causal LMs and, in ONNX Runtime, the KV-cache graph
    (``model_kv.onnx``) that every ONNX variant of a causal LM ships. A promoted
    variant it cannot run (no KV graph, or a format it does not know) is replaced
    by the torch model it was built from (the optimize stage's ``source/`` when it
    merged an adapter, else the train artifact's model), and the note says so.

    Raises:
        StageError: neither an optimize nor a train artifact is given.
    """
    opt = inputs.get("optimize")
    note = ""
    if opt is not None:
        promoted = Path(opt.path) / "model"
        info_file = promoted / "variant.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text(encoding="utf-8"))
            name, backend, task = info.get("variant"), info.get("backend"), info.get("task")
            weights = any(promoted.glob("*.safetensors"))
            if task == "causal-lm" and backend == "torch" and weights:
                return Choice(promoted, None, "optimize", name, f"promoted variant {name}")
            if task == "causal-lm" and backend == "onnxruntime" and (promoted / KV_ONNX).is_file():
                note = f"promoted variant {name}, its KV-cache graph run in ONNX Runtime"
                return Choice(promoted, None, "optimize", name, note, backend="onnx")
            note = (
                f"the promoted variant {name!r} ({backend}, {task}) cannot run in the "
                "continuous-batching engine (no KV-cache graph); serving the torch model it "
                "was built from"
            )
            source = Path(opt.path) / "source"
            if (source / "config.json").is_file():
                return Choice(source, None, "optimize", name, note)
        else:
            note = "the optimize stage promoted no variant; serving the trained model"
    train = inputs.get("train")
    if train is None:
        raise StageError(
            "the serve stage needs the 'optimize' or the 'train' artifact",
            hint="add 'train' (and optionally 'optimize') before 'serve' in stages",
        )
    model, adapter = _train_model(Path(train.path))
    return Choice(model, adapter, "train", None, note or "trained model")


def _prompts(cfg: ServeStageConfig) -> list[str]:
    if cfg.prompts == "humaneval":
        from modelkiln.data.humaneval import read_humaneval

        return [row["prompt"] for row in read_humaneval()]
    return list(BUILTIN_PROMPTS)


def _fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _report(choice: Choice, cfg: ServeStageConfig, runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## Serve",
        "",
        f"Served `{choice.path}`"
        + (f" + adapter `{choice.adapter}` (merged)" if choice.adapter else "")
        + f" from the {choice.source} stage: {choice.note}.",
        "",
        f"Load test: streaming `/v1/completions`, {cfg.max_tokens} new tokens per request, "
        f"greedy, {cfg.prompts} prompts; goodput SLO TTFT <= {cfg.slo_ttft_ms:g} ms and "
        f"TPOT <= {cfg.slo_tpot_ms:g} ms. The load generator runs in the server's process.",
        "",
        "| run | requests (ok) | req/s | out tok/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms "
        "| ITL p95 ms | goodput req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in runs.values():
        lines.append(
            f"| {s['mode']} | {s['requests']} ({s['ok']}) | {_fmt(s['throughput_rps'], 2)} "
            f"| {_fmt(s['output_tokens_per_s'])} | {_fmt(s['ttft_p50_ms'])} / "
            f"{_fmt(s['ttft_p95_ms'])} | {_fmt(s['tpot_p50_ms'])} / {_fmt(s['tpot_p95_ms'])} "
            f"| {_fmt(s['itl_p95_ms'])} | {_fmt(s.get('goodput_rps'), 2)} |"
        )
    errors = [s["first_error"] for s in runs.values() if "first_error" in s]
    if errors:
        lines += ["", f"First error: `{errors[0]}`"]
    return "\n".join(lines) + "\n"


def run_serve_stage(ctx: StageContext) -> None:
    """Pipeline entry point: serve, load-test, drain, record metrics and ``report.md``.

    Raises:
        StageError: no model to serve, or the server did not start.
    """
    from modelkiln.serve.config import GenerationConfig, ModelSpec, ServeConfig
    from modelkiln.bench import SLO, run_load
    from modelkiln.serve.server import ModelServer

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
    prompts = _prompts(cfg)
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
        reports["closed"] = run_load(url, prompts, concurrency=cfg.concurrency,
                                     num_requests=cfg.requests, duration_s=cfg.duration_s,
                                     **common)  # fmt: skip
        if cfg.rate is not None:
            reports["open"] = run_load(url, prompts, rate=cfg.rate, num_requests=cfg.requests,
                                       duration_s=cfg.duration_s, **common)  # fmt: skip
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
    (ctx.out / "serve.json").write_text(
        json.dumps({"server": serve_cfg.model_dump(mode="json"), "runs": runs}, indent=2),
        encoding="utf-8",
    )
    per_request = {k: [asdict(x) for x in r.results] for k, r in reports.items()}
    (ctx.out / "requests.json").write_text(json.dumps(per_request), encoding="utf-8")
    (ctx.out / "report.md").write_text(_report(choice, cfg, runs), encoding="utf-8")
