"""Generation over real uvicorn on loopback, driven by the official ``openai`` client:
the real engine on a tiny GPT-2, and a scripted engine for chat and client disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from serve_support import FakeEngine, code_tokenizer, save_tiny_gpt2

from modelkiln.serve import ModelServer, ServeConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module", params=["torch", "onnx"])
def gpt2_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The tiny GPT-2 on each generation backend (onnx: its KV-cache graph, exported at load)."""
    try:
        import modelkiln.serve.generation.engine  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the generation engine is not available: {exc}")
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
    path = save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")
    model = {"path": str(path), "backend": request.param}
    cfg = ServeConfig.model_validate({"models": [model], "port": 0})
    server = ModelServer(config=cfg)
    url = server.start(timeout=60)
    yield url
    server.stop()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(code_tokenizer(chat=True), delay=0.01, max_model_len=4096)
    cfg = ServeConfig.model_validate({"models": [{"path": "fake", "name": "chat"}], "port": 0})
    server = ModelServer(config=cfg, engines={"chat": engine})
    url = server.start(timeout=30)
    yield url, engine
    server.stop()


def test_openai_client_completions_and_streaming_on_the_real_engine(gpt2_server: str) -> None:
    client = openai.OpenAI(base_url=gpt2_server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-gpt2"]
    done = client.completions.create(model="tiny-gpt2", prompt="def add(", max_tokens=8,
                                     temperature=0)  # fmt: skip
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length") and done.usage is not None
    assert done.usage.completion_tokens <= 8
    stream = client.completions.create(model="tiny-gpt2", prompt="def add(", max_tokens=8,
                                       temperature=0, stream=True)  # fmt: skip
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed == choice.text  # greedy: streaming and not streaming agree
    fim = client.completions.create(model="tiny-gpt2", prompt="def f(", suffix="):\n", max_tokens=4)
    assert fim.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}]
        )
    r = httpx.post(gpt2_server + "/inference", json={"text": "class A", "max_length": 5})
    assert r.status_code == 200 and len(r.json()["generated_text"]) == 1


def test_openai_client_chat_and_chat_streaming(fake_server: tuple[str, FakeEngine]) -> None:
    url, _ = fake_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "t0 t1 t2 "
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=3,  # type: ignore[arg-type]
                                            stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "t0 t1 t2 "


def _wait_cancelled(engine: FakeEngine, before: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(engine.cancelled) > before:
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_cancels_generation(fake_server: tuple[str, FakeEngine]) -> None:
    url, engine = fake_server
    body = {"model": "chat", "prompt": "x", "max_tokens": 2000, "stream": True}
    before = len(engine.cancelled)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream is running; now hang up
    assert _wait_cancelled(engine, before), "streaming request not cancelled"

    async def abandon() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            task = asyncio.create_task(
                c.post(url + "/v1/completions", json=body | {"stream": False})
            )
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    before = len(engine.cancelled)
    asyncio.run(abandon())
    assert _wait_cancelled(engine, before), "non-streaming request not cancelled"
