"""``kiln bench serve`` against a mock server with a fixed service time and one worker.

The acceptance check of open-loop measurement: Poisson arrivals at a rate that
queues, one request in flight at a time (the rest wait on the client, as with
vLLM's ``--max-concurrency``). The reported p99 response time must match a
discrete-event simulation of the same FIFO queue fed the same scheduled send
times and the service times the mock gave (a client that timed from the actual
send would report about the service time instead), and the service-time p99 must
match the mock's service time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_support import free_port, wait_ready

from modelkiln.bench import percentile
from modelkiln.bench.stats import fifo_response_times

MOCK = Path(__file__).with_name("bench_mock_server.py")
SERVICE_MS = 20.0


def _start(*extra: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    args = [sys.executable, str(MOCK), str(port), str(SERVICE_MS), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    if not extra:
        wait_ready(url, 30, proc)
    return proc, url


@pytest.fixture(scope="module")
def mock() -> Iterator[str]:
    proc, url = _start()
    yield url
    proc.kill()
    proc.wait()


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in its own process (the client alone on its interpreter)."""
    return subprocess.run([sys.executable, "-c", "from modelkiln.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_poisson_response_time_matches_the_queue_and_service_time_the_mock(
    mock: str, tmp_path: Path
) -> None:
    out = tmp_path / "run.json"
    rate = 0.7 / (SERVICE_MS / 1000)  # utilisation ~0.7 of the mock's one worker: it queues
    proc = kiln("bench", "serve", mock, "--kind", "embeddings", "--rate", f"{rate:.3f}",
                "--arrival", "poisson", "--max-concurrency", "1", "-n", "600", "--seed", "3",
                "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    s = result["summary"]
    assert result["model"] == "mock" and s["ok"] == 600 and s["errors"] == 0
    runs = result["run"]["results"]
    service = [r["latency"] for r in runs]
    # The service time is the mock's: one sleep of SERVICE_MS plus a loopback exchange.
    assert SERVICE_MS <= s["latency_p50_ms"] <= SERVICE_MS * 1.25
    # p99 carries the scheduling jitter of 2 shared cores (2.4x and 3.3x measured at load
    # averages 13-14): a sanity bound; the median above is the match with the mock.
    assert SERVICE_MS <= s["latency_p99_ms"] <= SERVICE_MS * 4
    # The same queue, fed the same scheduled times and the service times the mock gave.
    simulated = percentile(fifo_response_times([r["scheduled"] for r in runs], service), 99)
    assert simulated is not None
    assert s["response_p99_ms"] == pytest.approx(simulated * 1000, rel=0.05)
    # Queueing shows: the response time's tail is several service times.
    assert s["response_p99_ms"] > 3 * s["latency_p50_ms"]
    assert s["send_lag_p99_ms"] is not None and s["client_cpu_s"] > 0


def test_chat_closed_loop_trace_replay_and_slo_search(mock: str, tmp_path: Path) -> None:
    proc = kiln("bench", "serve", mock, "--kind", "chat", "-c", "2", "-n", "6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "closed loop, concurrency 2" in proc.stdout and "ttft_p50_ms" in proc.stdout
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": i * 0.05, "input_tokens": 8, "output_tokens": 4} for i in range(5)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "replay.json"
    proc = kiln("bench", "serve", mock, "--trace", str(trace), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    replay = json.loads(out.read_text())
    assert replay["summary"]["ok"] == 5 and replay["summary"]["mode"].startswith("trace replay")
    scheduled = sorted(r["scheduled"] for r in replay["run"]["results"])
    assert scheduled == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    out = tmp_path / "search.json"
    proc = kiln("bench", "serve", mock, "--kind", "embeddings", "--search", "--rate", "10",
                "--slo", "e2e_p95=60ms", "--max-concurrency", "1", "-n", "30",
                "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = json.loads(out.read_text())
    # One worker at 20 ms saturates at 50 req/s, so the SLO fails at 50 and above; where it
    # holds depends on the machine's load (at 10 req/s on an idle box), so the found rate is
    # checked against the probes rather than a fixed floor.
    best = found["best_rate_rps"]
    assert best is not None and 0 < best < 50
    assert all(p["rate"] < 50 or not p["ok"] for p in found["probes"])
    assert best == max(p["rate"] for p in found["probes"] if p["ok"])


def test_sweep_doubles_the_rate_until_the_one_worker_saturates(mock: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    proc = kiln("bench", "serve", mock, "--kind", "embeddings", "--sweep", "--rate", "20",
                "--max-concurrency", "1", "-n", "40", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    # 20 ms per request: 50 req/s at most, so 20 keeps up and 80 cannot.
    assert res["steps"][0]["offered_rps"] == 20
    assert res["saturated_at_rps"] in (40, 80) and res["max_throughput_rps"] < 50
    assert "saturated at" in proc.stdout


def test_bad_inputs_give_one_clear_error(tmp_path: Path) -> None:
    port = free_port()
    proc = kiln("bench", "serve", f"http://127.0.0.1:{port}", "-c", "1", "-n", "1")
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
    assert "Traceback" not in proc.stderr
    html, url = _start("--not-openai")
    try:
        wait_ready_html = kiln("bench", "serve", url, "-c", "1", "-n", "1")
        for _ in range(50):  # the process may still be binding its port
            if "cannot reach" not in wait_ready_html.stderr:
                break
            wait_ready_html = kiln("bench", "serve", url, "-c", "1", "-n", "1")
        assert wait_ready_html.returncode == 2
        assert "did not return an OpenAI model list" in wait_ready_html.stderr
    finally:
        html.kill()
        html.wait()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "output_tokens": 4}\nnot json\n')
    proc = kiln("bench", "serve", "http://127.0.0.1:1", "--trace", str(bad))
    assert proc.returncode == 2 and f"malformed trace line {bad}:2" in proc.stderr
    proc = kiln("bench", "serve", "http://127.0.0.1:1", "--rate", "1", "-n", "1",
                "--slo", "ttft_p95=fast")  # fmt: skip
    assert proc.returncode == 2 and "cannot parse SLO term 'ttft_p95=fast'" in proc.stderr
