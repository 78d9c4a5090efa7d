"""Rollouts on a real server: time to roll back an injected fault under real HTTP load at
10 requests/s, and the gateway's routing overhead (single version vs a 50/50 split).

Two registry versions of a tiny random GPT-2 (2 layers, fp32, torch) behind the rollout
gateway on loopback; completions of 4 tokens; the handbook's canary with the analysis mirror.
The load comes from ``modelkiln.bench.run_load`` (the generator of ``kiln bench serve``).

    python benchmarks/bench_rollout_server.py --runs 5     # ~6-8 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _record import machine_line, update_section
from serve_support import free_port, save_tiny_gpt2, wait_ready

from modelkiln.bench import run_load, run_load_async
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.registry import Registry
from modelkiln.rollout.serving import build_gateway, registry_versions

ADMIN = {"Authorization": "Bearer adm"}


def start_server(tmp: Path, faults: dict[str, FaultSpec]) -> tuple[str, Any, threading.Thread]:
    """The gateway over ``1 + len(faults)`` registry versions of one tiny GPT-2, on loopback."""
    import uvicorn

    reg = Registry(tmp / "reg")
    src = save_tiny_gpt2(tmp / "src")
    for _ in range(1 + len(faults)):
        reg.add("tiny", src)
    reg.promote("tiny", 1, "production")
    folders, serving = registry_versions(reg, "tiny", [str(v) for v in range(1, 2 + len(faults))])
    gw = build_gateway(
        "tiny", folders, serving=serving, state_dir=tmp / "state", admin_keys=["adm"],
        model_options={"backend": "torch", "precision": "fp32"},
        serve_config={"cache": {"enabled": False}, "max_queue_wait_s": 60},
        faults={v: FaultInjector(f, seed=int(v)) for v, f in faults.items()}, tick_s=0.2,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120)
    return url, server, thread


#: Overhead runs: sequential requests alternate between the two names; the first this many
#: of each name are warm-up.
WARMUP = 10


@dataclass
class Canary:
    """One canary under load: its length, outcome, what the clients saw, the last admin view."""

    seconds: float
    outcome: str
    transport_errors: int  # requests without a response
    non_200: int  # answers with an error status
    view: dict[str, Any]
    requests: int = 0  # sent (each one awaited to its end)


def canary_under_load(
    url: str, candidate: str, canary: dict[str, Any], rps: float, limit_s: float, seed: int
) -> Canary:
    """A canary of ``candidate`` under open-loop Poisson load (``modelkiln.bench.run_load``,
    ``rps`` requests/s, seeded), until it ends or ``limit_s`` (then it is aborted).

    Seconds run from the start decision to the rollback decision (the gateway's clock).
    """
    return asyncio.run(_canary(url, candidate, canary, rps, limit_s, seed))


async def _canary(
    url: str, candidate: str, canary: dict[str, Any], rps: float, limit_s: float, seed: int
) -> Canary:
    prompts = [f"def f{seed}_{i}(" for i in range(int(3 * rps * limit_s) + 100)]
    async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=30) as admin:
        r = await admin.post(
            "/admin/rollout/tiny/start", json={"candidate": candidate, "canary": canary}
        )
        r.raise_for_status()
        started = r.json()["decisions"][-1]["time"]
        t0 = time.monotonic()
        # Greedy and unstreamed (one JSON answer per request), so the analysis mirror's
        # agreement check applies as it does to such clients. The load runs until ``stop``
        # (or limit_s); then no more are sent and those in flight are awaited.
        stop = asyncio.Event()
        load = asyncio.create_task(run_load_async(
            url, prompts, kind="completions", model="tiny", max_tokens=4, rate=rps,
            arrival="poisson", seed=seed, duration_s=limit_s, max_concurrency=64,
            stream=False, until=stop.is_set,
        ))  # fmt: skip
        status, view = "running", {}
        while status == "running" and not load.done():
            await asyncio.sleep(0.5)
            view = (await admin.get("/admin/rollout/tiny")).json()
            status = view["rollout"]["status"]
        if status == "running":  # the load ran its limit_s: still no decision
            seconds, outcome = time.monotonic() - t0, "still running at the limit"
            await admin.post("/admin/rollout/tiny/abort")
        else:
            last = view["decisions"][-1]
            seconds, outcome = last["time"] - started, f"{status}: {last['reason']}"
            await asyncio.sleep(2.0)  # the load goes on 2 s past the rollback
        stop.set()
        report = await load
    results = report.results
    transport = sum(r.status == 0 for r in results)
    non_200 = sum(r.status not in (0, 200) for r in results)
    # (report.client_cpu_s is not the client's here: the gateway runs in this process.)
    return Canary(seconds, outcome, transport, non_200, view, len(results))


def sequential_ms(url: str, pairs: list[tuple[str, str]]) -> dict[str, list[float]]:
    """Milliseconds of each ``(model, prompt)`` of ``pairs`` sent one after another, in
    order, over one keep-alive connection (one ``run_load`` run), by model."""
    report = run_load(url, pairs, kind="completions", max_tokens=4, concurrency=1,
                      num_requests=len(pairs), stream=False)  # fmt: skip
    bad = [r for r in report.results if not r.ok]
    if bad:
        raise RuntimeError(f"HTTP {bad[0].status} {bad[0].error}")
    out: dict[str, list[float]] = {}
    # Concurrency 1: the results come back in the order of ``pairs``.
    for (model, _), r in zip(pairs, report.results, strict=True):
        out.setdefault(model, []).append(r.latency * 1000)
    return out


def overhead(n: int) -> dict[str, tuple[float, float]]:
    """p50 / p99 ms, interleaved request by request with the served name (no routing):
    one version, then a 50/50 split, then the split with the analysis mirror on."""
    out: dict[str, tuple[float, float]] = {}
    phases = (
        (None, "gateway, one version"),
        ({"steps": [50, 100], "dwell_s": 3600, "mirror_percent": 0}, "gateway, 50/50 split"),
        ({"steps": [50, 100], "dwell_s": 3600}, "gateway, 50/50 split + 100 % analysis mirror"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        url, server, thread = start_server(Path(tmp), {"2": FaultSpec()})
        with httpx.Client(base_url=url, timeout=30) as c:
            for canary, label in phases:
                if canary:
                    c.post("/admin/rollout/tiny/abort", headers=ADMIN)  # 409 when none: fine
                    c.post("/admin/rollout/tiny/start", headers=ADMIN,
                           json={"candidate": "2", "canary": canary}).raise_for_status()  # fmt: skip
                pairs = [(model, f"def f{i}(") for i in range(n + WARMUP)
                         for model in ("tiny.v1", "tiny")]  # fmt: skip
                times = {m: ms[WARMUP:] for m, ms in sequential_ms(url, pairs).items()}
                for model, name in (
                    ("tiny.v1", f"served name (no routing), beside {label}"),
                    ("tiny", label),
                ):
                    q = statistics.quantiles(times[model], n=100)
                    out[name] = (statistics.median(times[model]), q[98])
        server.should_exit = True
        thread.join(30)
    return out


FAULTS = {
    "2": ("10 % errors", FaultSpec(error_rate=0.1)),
    "3": ("+200 ms", FaultSpec(extra_latency_ms=200)),
}
HANDBOOK = {"steps": [5, 25, 50, 100], "dwell_s": 600, "check_interval_s": 30}


def aa_rows(url: str, seconds: float, rps: float) -> list[str]:
    """A/A on the real server: a canary of v4 (same weights, no fault) for ``seconds``."""
    if seconds <= 0:
        return []
    run = canary_under_load(url, "4", HANDBOOK, rps, seconds, 7)
    view = run.view if run.outcome.startswith("still") else {}
    checks = [d for d in view.get("decisions", []) if d["numbers"].get("log_evidence")]
    named = ("errors", "latency", "latency_p50", "slo_errors", "slo_latency")
    top = {t: max((d["numbers"]["log_evidence"][t] for d in checks), default=float("nan"))
           for t in named}  # fmt: skip
    bound = checks[-1]["numbers"]["bound"] if checks else float("nan")
    shown = ", ".join(f"{t} {v:.2f}" for t, v in top.items())
    row = (f"| A/A: v4 = same weights, no fault | {run.seconds:.0f} s | {run.requests} "
           f"| {run.transport_errors} | {run.non_200} | {run.outcome[:60]}; "
           f"largest log-evidence at a check: {shown} (bound {bound:.2f}) |")  # fmt: skip
    print(row, flush=True)
    return ["", "| real-server A/A | ran | requests | client errors | non-200 | outcome |",
            "|---|---:|---:|---:|---:|---|", row]  # fmt: skip


def rollback_rows(runs: int, rps: float, aa_s: float) -> list[str]:
    """``runs`` canaries of each faulty version on one server, interleaved; table rows."""
    took: dict[str, list[float]] = {v: [] for v in FAULTS}
    rows = ["| run | injected fault (5 % canary) | s to rollback | requests | client errors "
            "| non-200 | outcome |", "|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        faults = {v: f for v, (_, f) in FAULTS.items()} | {"4": FaultSpec()}
        url, server, thread = start_server(Path(tmp), faults)
        aa = aa_rows(url, aa_s, rps)
        for run in range(runs):
            for v, (label, _) in FAULTS.items():
                c = canary_under_load(url, v, HANDBOOK, rps, 120, 100 * run + int(v))
                took[v].append(c.seconds if c.outcome.startswith("rolled-back") else float("inf"))
                rows.append(f"| {run + 1} | {label} | {c.seconds:.1f} | {c.requests} "
                            f"| {c.transport_errors} | {c.non_200} | {c.outcome[:120]} |")  # fmt: skip
                print(rows[-1], flush=True)
        server.should_exit = True
        thread.join(30)
    rows += [
        "",
        "| injected fault | runs | median s | max s | within 30 s |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, (label, _) in FAULTS.items():
        xs = took[v]
        ok = sum(x <= 30 for x in xs)
        rows.append(
            f"| {label} | {len(xs)} | {statistics.median(xs):.1f} | {max(xs):.1f} | {ok}/{len(xs)} |"
        )
    return rows + aa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rps", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=5, help="Canaries per fault kind.")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--aa-seconds", type=float, default=120, help="A/A canary length (0: none).")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    rows = rollback_rows(args.runs, args.rps, args.aa_seconds)
    rows += ["", "| path (sequential requests, 4 tokens) | p50 ms | p99 ms |", "|---|---:|---:|"]
    for label, (p50, p99) in overhead(args.requests).items():
        rows.append(f"| {label} | {p50:.1f} | {p99:.1f} |")
        print(rows[-1], flush=True)
    load1 = os.getloadavg()[0]
    md = "\n".join([
        "## rollout-server: rollback under real HTTP load, gateway overhead",
        "",
        f"`{shlex.join(['python', *sys.argv])}`. " + machine_line(),
        "",
        f"Tiny random GPT-2 (2 layers, fp32, torch), three registry versions behind the rollout "
        f"gateway on loopback (v2 fails 10 % of requests, v3 answers 200 ms later), open-loop "
        f"Poisson {args.rps:g} requests/s (seeded) of greedy 4-token completions, unstreamed, sent by `modelkiln.bench.run_load` "
        "(the generator of `kiln bench serve`; at most 64 in flight). "
        "The handbook's canary: 5/25/50/100 %, 10 min per stage, checks every 30 s; the analysis "
        "mirror on (default `mirror_percent: 100`: every request also runs on the other "
        "version, answer discarded) and the sequential tests updated every second "
        "(`analysis_interval_s: 1`), so a test that crosses its bound rolls back at once. "
        "Seconds count from the start decision to the rollback decision on the gateway's clock "
        "(the fault is there from the first request). The load goes on 2 s after the rollback "
        "decision, then stops sending (`run_load`'s `until`); the requests in flight then are "
        "awaited and counted. Client errors = "
        "requests without a response, non-200 = answers with an error status (the injected "
        "errors that reached clients). A/A: a canary of v4 (same weights as v1, no fault) "
        "under the same load first: it must not roll back; its largest log-evidence at a check "
        "against the bound shows the margin. Overhead: sequential requests to `tiny` (routed) "
        "alternating request by request with the same requests to the served name `tiny.v1` "
        "(passed through; one `run_load` run per phase with `(model, prompt)` pairs, "
        f"concurrency 1, one keep-alive connection; the first {WARMUP} of each name are "
        "warm-up): one version, a 50/50 split without mirror, and with the mirror (each "
        "request then also runs on the other version at the same time: that row is the cost "
        "of analysing, not of routing). Response cache off, a new prompt each request, the server's queue-wait admission bound raised to 60 s (`max_queue_wait_s`) so the loaded machine does not shed requests with 429. "
        f"**1-minute load average {load0:.1f} at the start, {load1:.1f} at the end: on a "
        "loaded machine absolute milliseconds are noisy.**",
        "",
        *rows,
    ])  # fmt: skip
    if not args.no_record:
        update_section("rollout-server", md)
    print(md)


if __name__ == "__main__":
    main()
