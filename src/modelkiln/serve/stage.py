"""The ``serve`` pipeline stage's own parts: its config, the model it serves, its report.

:func:`choose_model` picks the model (the promoted optimize variant when the
engine can run it, else a torch model), :func:`stage_prompts` the prompts, and
:func:`stage_report` writes the report section. The stage's run — start the
real server, load-test it with the bench package's load generator, drain —
composes two packages, so it lives in the wiring layer
(:func:`modelkiln.pipeline_serve.run_serve_stage`).

Stage layout (``out``)::

    report.md     what was served (and why), the load-test table
    serve.json    the ServeConfig used and every summary
    requests.json per-request TTFT / TPOT / latency / status of every run

Example:
    >>> choose_model({"train": train_artifact}).note
    'trained model'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from modelkiln.configbase import KilnModel
from modelkiln.contract import (
    MODEL_DIR,
    SOURCE_DIR,
    VARIANT_JSON,
    has_kv_graph,
    is_hf_model_dir,
    read_variant_json,
    train_model,
)
from modelkiln.errors import ArtifactError, StageError

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
class ServeTarget:
    """The model the stage serves and why."""

    path: Path
    adapter: Path | None
    source: str  # "optimize" or "train"
    variant: str | None = None
    note: str = ""
    backend: Literal["torch", "onnx"] = "torch"


def choose_model(inputs: dict[str, Any]) -> ServeTarget:
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
        promoted = Path(opt.path) / MODEL_DIR
        if (promoted / VARIANT_JSON).is_file():
            info = read_variant_json(promoted)
            name, backend, task = info.get("variant"), info.get("backend"), info.get("task")
            weights = any(promoted.glob("*.safetensors"))
            if task == "causal-lm" and backend == "torch" and weights:
                return ServeTarget(promoted, None, "optimize", name, f"promoted variant {name}")
            if task == "causal-lm" and backend == "onnxruntime" and has_kv_graph(promoted):
                note = f"promoted variant {name}, its KV-cache graph run in ONNX Runtime"
                return ServeTarget(promoted, None, "optimize", name, note, backend="onnx")
            note = (
                f"the promoted variant {name!r} ({backend}, {task}) cannot run in the "
                "continuous-batching engine (no KV-cache graph); serving the torch model it "
                "was built from"
            )
            source = Path(opt.path) / SOURCE_DIR
            if is_hf_model_dir(source):
                return ServeTarget(source, None, "optimize", name, note)
        else:
            note = "the optimize stage promoted no variant; serving the trained model"
    train = inputs.get("train")
    if train is None:
        raise StageError(
            "the serve stage needs the 'optimize' or the 'train' artifact",
            hint="add 'train' (and optionally 'optimize') before 'serve' in stages",
        )
    try:
        model, adapter = train_model(train.path)
    except ArtifactError as exc:
        raise StageError(exc.message, hint=exc.hint) from exc
    return ServeTarget(model, adapter, "train", None, note or "trained model")


def stage_prompts(cfg: ServeStageConfig) -> list[str]:
    if cfg.prompts == "humaneval":
        from modelkiln.contract.corpus import read_humaneval

        return [row["prompt"] for row in read_humaneval()]
    return list(BUILTIN_PROMPTS)


def _fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def stage_report(
    choice: ServeTarget, cfg: ServeStageConfig, runs: dict[str, dict[str, Any]]
) -> str:
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
