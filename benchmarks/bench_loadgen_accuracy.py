"""How exact is ``kiln bench serve``'s open-loop response time? (coordinated omission check)

    python benchmarks/bench_loadgen_accuracy.py [--requests 600] [--service-ms 20]

Starts the one-worker mock server of the tests (fixed service time), runs
``kiln bench serve --arrival poisson --max-concurrency 1`` at three utilisations,
and compares the reported response time with (a) a FIFO simulation fed the same
scheduled send times and the measured service times, (b) the analytic M/D/1 mean
``D + rho * D / (2 (1 - rho))``, and (c) what a client that times from the actual
send reports (the service time: vLLM#54101's mistake). Writes the
``bench-loadgen`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine_line, update_section

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests" / "integration" / "bench_mock_server.py"


def _p(values: list[float], q: float) -> float:
    from modelkiln.bench import percentile

    return float(percentile(values, q) or 0.0)


def run(url: str, rate: float, n: int, out: Path) -> dict[str, float]:
    """One ``kiln bench serve`` run; the figures of one table row."""
    cmd = [
        sys.executable,
        "-c",
        "from modelkiln.cli import main; main()",
        "bench",
        "serve",
        url,
        "--kind",
        "embeddings",
        "--rate",
        f"{rate:.3f}",
        "--max-concurrency",
        "1",
        "-n",
        str(n),
        "--seed",
        "1",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    res = json.loads(out.read_text())
    runs, s = res["run"]["results"], res["summary"]
    service = [r["latency"] for r in runs]
    from modelkiln.bench.stats import fifo_response_times

    sim = fifo_response_times([r["scheduled"] for r in runs], service)
    d = statistics.fmean(service)
    rho = rate * d
    return {
        "rate": rate,
        "rho": rho,
        "service_p99": s["latency_p99_ms"],
        "response_p99": s["response_p99_ms"],
        "sim_p99": _p(sim, 99) * 1000,
        "response_mean": statistics.fmean(
            r["latency"] + max(r["start"] - r["scheduled"], 0) for r in runs
        )
        * 1000,
        "md1_mean": (d + rho * d / (2 * (1 - rho))) * 1000 if rho < 1 else float("nan"),
        "send_lag_p99": s["send_lag_p99_ms"],
        "cpu": s["client_cpu_util"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three utilisations and record the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--service-ms", type=float, default=20.0)
    p.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from serve_support import free_port, wait_ready

    port = free_port()
    server = subprocess.Popen([sys.executable, str(MOCK), str(port), str(args.service_ms)])
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(url, 30, server)
        with tempfile.TemporaryDirectory() as tmp:
            for rho in (0.5, 0.7, 0.85):
                rate = rho / (args.service_ms / 1000)
                rows.append(run(url, rate, args.requests, Path(tmp) / f"{rho}.json"))
    finally:
        server.kill()
        server.wait()
    lines = [
        "## Load generator accuracy (`kiln bench serve`, open loop)",
        "",
        machine_line(),
        "",
        f"Command: `python benchmarks/bench_loadgen_accuracy.py --requests {args.requests} "
        f"--service-ms {args.service_ms:g}` (a one-worker mock with a fixed {args.service_ms:g} ms "
        "service time; Poisson arrivals; one request in flight, the rest wait on the client).",
        "",
        "| offered req/s | utilisation | service p99 ms (from send) | response p99 ms (from "
        "schedule) | FIFO simulation p99 ms | response mean ms | M/D/1 mean ms | send lag p99 ms "
        "| client CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate']:.1f} | {r['rho']:.2f} | {r['service_p99']:.1f} | "
            f"{r['response_p99']:.1f} | {r['sim_p99']:.1f} | {r['response_mean']:.1f} | "
            f"{r['md1_mean']:.1f} | {r['send_lag_p99']:.2f} | {r['cpu']:.1%} |"
        )
    lines += [
        "",
        "A client that timed from the actual send would report the service column; "
        "the response column is what users of a queueing server see. Utilisation uses the "
        "measured mean service time (mock sleep + loopback exchange); near utilisation 1 a "
        "finite run is far from steady state, so the analytic mean does not apply there. The machine was "
        "shared with parallel work while measuring: absolute figures are noisy.",
    ]
    if not args.no_record:
        update_section("bench-loadgen", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
