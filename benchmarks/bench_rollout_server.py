"""Rollouts on a real server: time to roll back an injected fault under real HTTP load at
10 requests/s, and the gateway's routing overhead (single version vs a 50/50 split).

Two registry versions of a tiny random GPT-2 (2 layers, fp32, torch) behind the rollout
gateway on loopback; completions of 4 tokens. Canary 50/100 %, checks every 5 s.

    python benchmarks/bench_rollout_server.py        # ~3-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _record import machine_line, update_section
from serve_support import free_port, save_tiny_gpt2, wait_ready

from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.registry import Registry
from modelkiln.rollout.serving import build_gateway, registry_versions

ADMIN = {"Authorization": "Bearer adm"}
BODY = {"model": "tiny", "prompt": "def add(", "max_tokens": 4, "temperature": 0}


def start_server(tmp: Path, fault: FaultSpec) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    reg = Registry(tmp / "reg")
    src = save_tiny_gpt2(tmp / "src")
    for _ in range(2):
        reg.add("tiny", src)
    reg.promote("tiny", 1, "production")
    folders, serving = registry_versions(reg, "tiny", ["1", "2"])
    gw = build_gateway(
        "tiny", folders, serving=serving, state_dir=tmp / "state", admin_keys=["adm"],
        model_options={"backend": "torch", "precision": "fp32"},
        serve_config={"cache": {"enabled": False}},
        faults={"2": FaultInjector(fault, seed=0)}, tick_s=0.2,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120)
    return url, server, thread


def rollback_seconds(fault: FaultSpec, rps: float, limit_s: float) -> tuple[float, str, int]:
    """Seconds from the start of a 50 % canary with a faulty candidate to its rollback."""
    with tempfile.TemporaryDirectory() as tmp:
        url, server, thread = start_server(Path(tmp), fault)
        canary = {"steps": [50, 100], "dwell_s": 600, "check_interval_s": 5, "min_requests": 5}
        httpx.post(url + "/admin/rollout/tiny/start", headers=ADMIN,
                   json={"candidate": "2", "canary": canary}).raise_for_status()  # fmt: skip
        t0, sent, status = time.monotonic(), 0, "running"
        view: dict[str, Any] = {}
        failed = [0]

        def one() -> None:
            try:
                httpx.post(url + "/v1/completions", json=BODY, timeout=30)
            except httpx.HTTPError:
                failed[0] += 1

        while time.monotonic() - t0 < limit_s and status == "running":
            threading.Thread(target=one, daemon=True).start()  # open loop: rps regardless
            sent += 1
            time.sleep(max(0.0, t0 + sent / rps - time.monotonic()))
            if sent % 5 == 0:
                view = httpx.get(url + "/admin/rollout/tiny", headers=ADMIN, timeout=10).json()
                status = view["rollout"]["status"]
        took = time.monotonic() - t0
        reason = (
            (view.get("decisions") or [{}])[-1].get("reason", "")
            if status != "running"
            else "(still running)"
        )
        server.should_exit = True
        thread.join(30)
        return took, f"{status}: {reason}", failed[0]


def overhead(n: int) -> dict[str, tuple[float, float]]:
    """p50 / p99 ms, interleaved request by request with the served name (no routing):
    first one version vs the served name, then a 50/50 split vs the served name."""
    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url, server, thread = start_server(Path(tmp), FaultSpec())
        with httpx.Client(base_url=url, timeout=30) as c:
            for phase, label in ((None, "gateway, one version"), (50, "gateway, 50/50 split")):
                if phase:
                    c.post("/admin/rollout/tiny/start", headers=ADMIN, json={"candidate": "2",
                           "canary": {"steps": [phase, 100], "dwell_s": 3600}}).raise_for_status()  # fmt: skip
                times: dict[str, list[float]] = {"tiny.v1": [], "tiny": []}
                for i in range(n + 10):
                    for model in times:
                        body = BODY | {"model": model, "prompt": f"def f{i}("}
                        t = time.perf_counter()
                        c.post("/v1/completions", json=body).raise_for_status()
                        if i >= 10:  # warm-up
                            times[model].append((time.perf_counter() - t) * 1000)
                for model, name in (
                    ("tiny.v1", f"served name (no routing), beside {label}"),
                    ("tiny", label),
                ):
                    q = statistics.quantiles(times[model], n=100)
                    out[name] = (statistics.median(times[model]), q[98])
        server.should_exit = True
        thread.join(30)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rps", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    rows = [
        "| injected fault on v2 (50 % canary) | seconds to rollback | client errors | outcome |",
        "|---|---:|---:|---|",
    ]
    for label, fault in (
        ("10 % errors", FaultSpec(error_rate=0.1)),
        ("+200 ms", FaultSpec(extra_latency_ms=200)),
    ):
        took, outcome, failed = rollback_seconds(fault, args.rps, 180)
        rows.append(f"| {label} | {took:.1f} | {failed} | {outcome[:110]} |")
        print(rows[-1], flush=True)
    rows += ["", "| path (sequential requests, 4 tokens) | p50 ms | p99 ms |", "|---|---:|---:|"]
    for label, (p50, p99) in overhead(args.requests).items():
        rows.append(f"| {label} | {p50:.1f} | {p99:.1f} |")
        print(rows[-1], flush=True)
    md = "\n".join([
        "## rollout-server: rollback under real HTTP load, gateway overhead",
        "",
        f"`{shlex.join(['python', *sys.argv])}`. " + machine_line(),
        "",
        f"Tiny random GPT-2 (2 layers, fp32, torch), two registry versions behind the rollout "
        f"gateway on loopback, open-loop {args.rps:g} requests/s of 4-token completions. Canary "
        "50/100 %, checks every 5 s (the handbook's 30 s would add up to 30 s). Delay counts "
        "from the start of the canary (the fault is there from the first request). Overhead: "
        "requests to `tiny` (routed) interleaved one by one with the same requests to the "
        "served name `tiny.v1` (passed through, no routing): first with one version, then split "
        "50/50 (response cache off, a new prompt "
        "each request). The machine was loaded by other "
        "agents' parallel work: absolute milliseconds are noisy.",
        "",
        *rows,
    ])  # fmt: skip
    if not args.no_record:
        update_section("rollout-server", md)
    print(md)


if __name__ == "__main__":
    main()
