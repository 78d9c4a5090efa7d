"""One server process vs two on this box: do several workers beat one (``kiln serve --workers``)?

Two workloads, each closed loop with modelkiln's load generator in this process:

- embeddings: all-MiniLM-L6-v2 (torch), ``/v1/embeddings``, unique ``--emb-tokens``-token
  inputs (no cache hits), ``--clients`` clients;
- completions: the quickstart's Llama ``small`` preset (random weights, stdlib BPE; see
  bench_serve_completions.py), streaming ``/v1/completions``, ``--tokens`` tokens each.

Side by side, in interleaved rounds (A B A B ...) so drift on a shared machine hits both:

- **1 process**: ``python -m modelkiln.serve --threads 2`` (the cores it has), all clients;
- **2 processes**: ``--workers 2`` (one listening socket inherited by both, ``--threads 1`` each:
  the cores split between them). ``--separate-ports`` instead starts two plain servers on
  two ports and splits the clients half / half (what was measured before ``--workers``
  existed: the same two processes without the kernel's balancing).

    python benchmarks/bench_serve_workers.py          # ~4-6 min on a loaded 2-core machine
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _record import machine_line, update_section
from _servers import free_port, spawn, stop
from bench_serve_completions import build_model, make_prompts
from bench_serve_embeddings import Texts, minilm_dir

from modelkiln.bench.load import run_load_async


def _cmd(model: Path, name: str, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "modelkiln.serve", "--model-path", str(model), "--name", name,
            "--port", str(port), "--log-level", "warning", "--set", "cache.enabled=false",
            "--backend", "torch",
            *extra]  # fmt: skip


async def _window(urls: list[str], prompts: list[str], clients: int, seconds: float,
                  **kw: Any) -> dict[str, Any]:  # fmt: skip
    """Closed loop over ``urls`` (clients split evenly), merged into one summary."""
    share = [clients // len(urls) + (i < clients % len(urls)) for i in range(len(urls))]
    reports = await asyncio.gather(*(
        run_load_async(u, prompts, concurrency=n, duration_s=seconds, **kw)
        for u, n in zip(urls, share, strict=True)))  # fmt: skip
    merged = dataclasses.replace(reports[0], results=[r for rep in reports for r in rep.results],
                                 duration_s=max(rep.duration_s for rep in reports))  # fmt: skip
    return merged.summary()


def _med(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def measure(args: argparse.Namespace, workload: str, model: Path, prompts: list[str],
            kw: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Start both set-ups for ``workload``; interleaved rounds; stop them."""
    name = kw["model"]
    one_port = free_port()
    procs = [spawn(_cmd(model, name, one_port, ["--threads", "2"]),
                   f"http://127.0.0.1:{one_port}")[0]]  # fmt: skip
    if args.separate_ports:
        two = [free_port(), free_port()]
        for port in two:
            procs.append(spawn(_cmd(model, name, port, ["--threads", "1"]),
                               f"http://127.0.0.1:{port}")[0])  # fmt: skip
        urls2 = [f"http://127.0.0.1:{p}" for p in two]
    else:
        port = free_port()
        procs.append(spawn(_cmd(model, name, port, ["--workers", "2", "--threads", "1"]),
                           f"http://127.0.0.1:{port}", timeout=300)[0])  # fmt: skip
        urls2 = [f"http://127.0.0.1:{port}"]
    setups = {"1 process": [f"http://127.0.0.1:{one_port}"], "2 processes": urls2}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in setups}
    try:
        for urls in setups.values():
            asyncio.run(_window(urls, prompts, args.clients, 3, **kw))  # warm-up
        for i in range(args.rounds):
            order = list(setups) if i % 2 == 0 else list(reversed(setups))
            for key in order:
                runs[key].append(asyncio.run(_window(setups[key], prompts, args.clients,
                                                     args.seconds, **kw)))  # fmt: skip
            print(f"{workload} round {i + 1}: " + ", ".join(
                f"{k} {v[-1]['throughput_rps']:.1f} req/s" for k, v in runs.items()), flush=True)  # fmt: skip
    finally:
        for proc in procs:
            stop(proc)
    return runs


def main() -> None:
    """Measure both workloads; print and record the ``serve-workers`` section."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--emb-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--seconds", type=float, default=15.0, help="per window")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--separate-ports", action="store_true",
                   help="two plain servers on two ports instead of --workers 2")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    emb = minilm_dir()
    texts = Texts(emb, args.emb_tokens)
    results = {"embeddings": measure(args, "embeddings", emb, [texts() for _ in range(5000)],
                                     {"kind": "embeddings", "model": "minilm"})}  # fmt: skip
    lm = build_model(Path(tempfile.mkdtemp(prefix="kiln-bench-workers-")) / "code-lm")
    results["completions"] = measure(
        args, "completions", lm, make_prompts(lm, args.clients),
        {"kind": "completions", "model": "lm", "max_tokens": args.tokens})  # fmt: skip
    md = report(args, results, load_before, os.getloadavg()[0])
    print(md)
    if not args.no_write:
        update_section("serve-workers-ports" if args.separate_ports else "serve-workers", md)


def report(args: argparse.Namespace, results: dict[str, dict[str, list[dict[str, Any]]]],
           before: float, after: float) -> str:  # fmt: skip
    """The markdown section."""
    rows = []
    for workload, runs in results.items():
        base = _med(runs["1 process"], "throughput_rps")
        for key, rs in runs.items():
            per = ", ".join(f"{r['throughput_rps']:.1f}" for r in rs)
            rps = _med(rs, "throughput_rps")
            rows.append(f"| {workload} | {key} | {rps:.1f} ({per}) | {rps / base:.2f}x | "
                        f"{_med(rs, 'latency_p50_ms'):.0f} | {_med(rs, 'latency_p95_ms'):.0f} | "
                        f"{sum(r['errors'] for r in rs)} |")  # fmt: skip
    how = ("two plain servers on two ports, clients split half / half" if args.separate_ports
           else "`--workers 2` (one listening socket shared by both), `--threads 1` each")  # fmt: skip
    flags = " --separate-ports" if args.separate_ports else ""
    return f"""## kiln serve: 1 process vs 2 on one box (`--workers`)

`python benchmarks/bench_serve_workers.py --clients {args.clients} --seconds {args.seconds:g} \
--rounds {args.rounds}{flags}`

{machine_line()} **The machine was loaded by parallel work during this run (1-min load
average {before:.1f} before, {after:.1f} after, on 2 cores): absolute figures are noisy;
the interleaved side-by-side ratio is the point.**

1 process: `--threads 2`. 2 processes: {how}. Closed loop, {args.clients} clients, the
load generator in the benchmark's process on the same 2 cores; embeddings: MiniLM,
unique {args.emb_tokens}-token inputs; completions: Llama `small` preset (random weights),
{args.tokens} streamed tokens per request. Median of {args.rounds} interleaved windows of
{args.seconds:g} s (per-window figures in brackets).

| workload | set-up | requests/s | vs 1 process | p50 ms | p95 ms | errors |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    main()
