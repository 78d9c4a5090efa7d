"""Rate limits in Redis against a real ``redis-server`` on loopback: two limiters (two
replicas) share one bucket, concurrent acquires are atomic (Lua), and the guard keeps
limiting in-process when Redis dies."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_support import free_port

from modelkiln.contract.serving import RequestRejected
from modelkiln.security.keys import Principal
from modelkiln.security.ratelimit import RedisLimiter
from modelkiln.security.serving import PolicyGuard

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (scripts/ensure-test-services.sh)"
)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    import redis

    assert REDIS is not None
    port = free_port()
    proc = subprocess.Popen(
        [
            REDIS,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    for _ in range(200):  # up to ~10 s
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_two_replicas_share_one_bucket(redis_url: tuple[str, subprocess.Popen[bytes]]) -> None:
    a, b = RedisLimiter(redis_url[0]), RedisLimiter(redis_url[0])
    got = [lim.acquire("key:x", rpm=3, tpm=None).allowed for lim in (a, b, a, b)]
    assert got == [True, True, True, False]
    refused = b.acquire("key:x", rpm=3, tpm=None)
    assert refused.headers()["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers()["retry-after"]) <= 20
    assert a.acquire("key:y", rpm=3, tpm=None).allowed  # another key, another bucket
    a.debit("key:t", 600, 900)  # replica a charges a big answer ...
    assert not b.acquire("key:t", rpm=None, tpm=600).allowed  # ... replica b sees the debt


def test_concurrent_acquires_are_atomic(redis_url: tuple[str, subprocess.Popen[bytes]]) -> None:
    limiters = [RedisLimiter(redis_url[0]) for _ in range(8)]
    allowed: list[bool] = []
    lock = threading.Lock()

    def client(lim: RedisLimiter) -> None:
        for _ in range(10):
            ok = lim.acquire("key:c", rpm=20, tpm=None).allowed
            with lock:
                allowed.append(ok)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(lim,)) for lim in limiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    refilled = (time.monotonic() - started) * 20 / 60  # tokens that flowed in meanwhile
    assert len(allowed) == 80
    assert 20 <= sum(allowed) <= 20 + int(refilled)


def test_guard_falls_back_in_process_when_redis_dies(
    redis_url: tuple[str, subprocess.Popen[bytes]],
) -> None:
    guard = PolicyGuard(RedisLimiter(redis_url[0]))
    p = Principal(subject="key:z", key_id="key:z", scopes=frozenset({"infer"}), rpm=2)
    assert guard.admit(p, "lm", "/v1/completions", 10)["x-ratelimit-limit-requests"] == "2"
    redis_url[1].kill()
    redis_url[1].wait()
    guard.admit(p, "lm", "/v1/completions", 10)
    guard.admit(p, "lm", "/v1/completions", 10)
    with pytest.raises(RequestRejected) as exc:
        guard.admit(p, "lm", "/v1/completions", 10)
    assert exc.value.status == 429
