"""``kiln serve --workers 2`` as a real process on loopback: two workers on one port,
``/metrics`` summed over both, the response cache shared through a real ``redis-server``
(when installed; else off), Ctrl-C drains both and the supervisor exits 0."""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, start_process, stop_process

from modelkiln.errors import ConfigError

REDIS = shutil.which("redis-server")
BODY = {"model": "tiny", "prompt": "def f(", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str | None]:
    """A redis-server on loopback (None when not installed: the cache is then off)."""
    if REDIS is None:
        yield None
        return
    import redis

    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    for _ in range(200):  # ~10 s
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


def _metric(text: str, pattern: str) -> list[float]:
    return [float(v) for v in re.findall(pattern + r" ([0-9.e+]+)$", text, re.M)]


@pytest.mark.timeout(300)
def test_two_workers_share_the_port_the_metrics_and_the_cache(
    tmp_path: Path, redis_url: str | None
) -> None:
    model = save_tiny_gpt2(tmp_path / "tiny")
    cache = ["--cache-url", redis_url] if redis_url else ["--set", "cache.enabled=false"]
    port = free_port()
    proc = start_process(["--model-path", str(model), "--name", "tiny", "--workers", "2",
                          "--threads", "1", *cache],
                         port, timeout=240)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # start_process returns once one worker answers; the other may still be loading
        # on a busy machine. Both report ml_ready in the shared metrics once warm.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = httpx.get(url + "/metrics", timeout=10).text
            if _metric(text, r'^ml_ready\{pid="\d+"\}') == [1.0, 1.0]:
                break
            time.sleep(0.5)
        texts = set()
        for _ in range(12):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(url + "/v1/completions", json=BODY, timeout=60)
            assert r.status_code == 200, r.text
            texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1  # greedy: every worker gives the same answer
        scrapes = [httpx.get(url + "/metrics", timeout=10).text for _ in range(6)]
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the supervisor drains both workers
        assert proc.wait(timeout=90) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        stop_process(proc, timeout=90)
    for text in scrapes:  # whichever worker answers the scrape, it reports both
        ready = _metric(text, r'^ml_ready\{pid="\d+"\}')
        assert ready == [1.0, 1.0], text
        total = _metric(text, r'^ml_requests_total\{model_name="tiny",status="200"[^}]*\}')
        assert sum(total) == 12, text
        if redis_url:  # one cache for both workers: every repeat after the first is a hit
            assert sum(_metric(text, r'^ml_cache_hits_total\{model_name="tiny"\}')) == 11, text


def test_workers_without_redis_for_the_cache_or_the_limits_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelkiln.serve.__main__ import main
    from modelkiln.serve.config import ServeConfig
    from modelkiln.serve.workers import check_shared_state

    model = save_tiny_gpt2(tmp_path / "tiny")
    argv = ["--model-path", str(model), "--workers", "2", "--log-file", str(tmp_path / "log")]
    assert main(argv) == 2  # a config error: nothing started
    err = capsys.readouterr().err
    assert "--workers 2 with the in-process response cache" in err and "--cache-url" in err
    cfg = ServeConfig.model_validate({"models": [{"path": str(model)}], "workers": 3,
                                      "cache": {"enabled": False}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"--workers 3 .*--key-store") as info:
        check_shared_state(cfg, argparse.Namespace(key_store="keys", rate_limit_redis=None))
    assert "--rate-limit-redis" in str(info.value.hint)
    check_shared_state(cfg, argparse.Namespace(key_store="keys", rate_limit_redis="redis://x"))
