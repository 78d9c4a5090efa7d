"""Redis-backed response cache against a real ``redis-server`` on loopback: hits skip the
engine, and the server keeps answering (without cache) after Redis is killed."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_support import FakeEngine, free_port

from modelkiln.serve import ModelServer, ServeConfig

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    import redis

    assert REDIS is not None
    port = free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_redis_cache_hits_and_survives_redis_dying(
    redis_server: tuple[int, subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    port, proc = redis_server
    engine = FakeEngine()
    cfg = ServeConfig.model_validate({
        "models": [{"path": "fake", "name": "lm"}], "port": 0,
        "cache": {"url": f"redis://127.0.0.1:{port}/0", "ttl_s": 60},
    })  # fmt: skip
    server = ModelServer(config=cfg, engines={"lm": engine})
    url = server.start(timeout=30)
    try:
        greedy = {"model": "lm", "prompt": "def f(", "max_tokens": 3, "temperature": 0}
        first = httpx.post(url + "/v1/completions", json=greedy, timeout=10)
        second = httpx.post(url + "/v1/completions", json=greedy, timeout=10)
        assert first.status_code == second.status_code == 200
        assert first.json()["choices"] == second.json()["choices"]
        assert len(engine.requests) == 1  # the second answer came from Redis
        keys = redis.Redis(host="127.0.0.1", port=port).keys("modelkiln:*")
        assert len(keys) == 1
        ttl = redis.Redis(host="127.0.0.1", port=port).ttl(keys[0])
        assert 0 < ttl <= 60

        proc.kill()
        proc.wait()
        caplog.set_level(logging.WARNING, logger="modelkiln.serve.cache")
        for prompt in ("def f(", "class B", "import os"):
            started = time.monotonic()
            r = httpx.post(url + "/v1/completions", json=greedy | {"prompt": prompt}, timeout=10)
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 2.0
        assert len(engine.requests) == 4  # no cache: every request ran
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not per request
        metrics = httpx.get(url + "/metrics").text
        assert 'ml_cache_hits_total{model_name="lm"} 1.0' in metrics
    finally:
        server.stop()
