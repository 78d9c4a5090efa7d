"""A flood far past capacity against a real server process on loopback.

384 closed-loop clients that resend at once on a 429 (no backoff) drive a
model-bound encoder for a few seconds. The server must answer only 200 and
429 (no 5xx, no transport error), shed at the door, and keep what it admits
near the queue-wait bound: the server's own latency histogram of the 200s is
read, not the client's wall clock (the client shares the machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from overload_support import flood, save_slow_encoder
from serve_support import free_port, start_process, stop_process

WAIT_S = 0.5  # max_queue_wait_s of the server under test


def bucket_count(metrics: str, le: str) -> float:
    """Cumulative count of the 200s' latency histogram up to bucket ``le`` (model enc)."""
    for line in metrics.splitlines():
        head = line.startswith("ml_request_duration_seconds_bucket{")
        if head and f'le="{le}"' in line and 'model_name="enc"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = save_slow_encoder(tmp_path_factory.mktemp("slow") / "enc")
    port = free_port()
    proc = start_process(
        ["--model-path", str(model), "--name", "enc", "--precision", "fp32", "--threads", "1",
         "--set", "cache.enabled=false", "--set", f"max_queue_wait_s={WAIT_S}",
         # Counts far off: only the queue-wait estimate can shed.
         "--set", "max_queued_requests=100000", "--set", "max_queued_tokens=100000000"],
        port,
    )  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def test_flood_gets_only_200_and_429_and_admitted_latency_stays_bounded(server: str) -> None:
    seen = asyncio.run(flood(server, clients=384, seconds=8.0))
    metrics = httpx.get(server + "/metrics").text
    assert seen.errors == [], seen.errors[:5]
    assert set(seen.statuses) <= {200, 429}, seen.statuses
    assert seen.statuses.get(200, 0) > 0 and seen.statuses.get(429, 0) > 0, seen.statuses
    rejected = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("ml_rejections_total{") and 'reason="queue_wait"' in line
    )
    assert rejected > 0  # the estimate shed, not a count
    # Admitted requests: queue wait <= WAIT_S (estimated) + a batch's service time. 5 s
    # (a histogram bucket) is generous for that on a loaded 2-core CPU, and far below the
    # ~13 s a count-only queue of 384 requests gave here (measured before the estimate).
    total = bucket_count(metrics, "+Inf")
    assert total > 0
    assert bucket_count(metrics, "5.0") / total >= 0.95, metrics
