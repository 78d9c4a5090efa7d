"""The server's SSE path: chunks rendered without json.dumps, coalesced writes, the
single-choice fast path (cancellation, engine failures) — at the ASGI level and with the
official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from http_helpers import FakeEngine, client, config, run, sse_events
from hypothesis import given
from hypothesis import strategies as st

from modelkiln.serve import ModelServer, create_app
from modelkiln.serve.completions import _ChatChunks, _CompletionChunks, sse
from modelkiln.serve.generation.api import GenerationRequest, TokenEvent
from modelkiln.serve.schemas import Usage

STREAM = {"model": "lm", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}


class StepEngine(FakeEngine):
    """Emits one token to every live request per :meth:`step`, as the real engine's loop does.

    ``end_early``: streams stop after that many tokens without a finish event (a broken
    engine); ``fail_at``: the stream raises instead of emitting that token.
    """

    def __init__(self, end_early: int | None = None, fail_at: int | None = None) -> None:
        super().__init__(max_model_len=4096)
        self.end_early = end_early
        self.fail_at = fail_at
        self.live: dict[str, tuple[GenerationRequest, asyncio.Queue[TokenEvent | None]]] = {}
        self.made: dict[str, int] = {}

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
        self.live[request.request_id] = (request, queue)
        return self._events(request.request_id, queue)

    async def _events(
        self, rid: str, queue: asyncio.Queue[TokenEvent | None]
    ) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while (event := await queue.get()) is not None:
                if event.completion_tokens == self.fail_at:
                    raise RuntimeError("the model step blew up")
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
            finished = True  # end_early: the stream just stops
        finally:
            self.live.pop(rid, None)
            if not finished:
                self.cancelled.append(rid)

    def step(self) -> None:
        """One token for every live request (its last one finishes it)."""
        for rid, (request, queue) in list(self.live.items()):
            n = self.made[rid] = self.made.get(rid, 0) + 1
            if self.end_early is not None and n > self.end_early:
                queue.put_nowait(None)
                continue
            last = n == request.params.max_tokens
            queue.put_nowait(TokenEvent(rid, 10 + n, f"t{n} ", "length" if last else None,
                                        len(request.prompt_ids), n))  # fmt: skip


async def run_steps(engine: StepEngine, call: asyncio.Task[Any], requests: int, steps: int) -> None:
    """Wait for ``requests`` engine requests, run ``steps`` steps, then wait for ``call``."""
    while len(engine.live) < requests:
        await asyncio.sleep(0.001)
    for _ in range(steps):
        engine.step()
        await settle()
    await asyncio.wait_for(call, 5)


async def asgi_post(
    app: Any, body: dict[str, Any], writes: list[bytes], disconnect: asyncio.Event | None = None
) -> None:
    """POST ``body`` to /v1/completions at the ASGI level; every non-empty body write lands
    in ``writes`` (one entry per ``send``, so write boundaries are visible)."""
    sent = False
    gone = disconnect or asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            writes.append(bytes(message["body"]))

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("kiln", 80)}  # fmt: skip
    await app(scope, receive, send)


async def settle() -> None:
    """Let every task woken by an engine step run to its next wait."""
    for _ in range(20):
        await asyncio.sleep(0)


RID, MODEL = "cmpl-\u2603\n", 'lm \u00e9"'  # characters JSON must escape


def old_chunk(obj: str, i: int | None, choice: dict[str, Any]) -> dict[str, Any]:
    """The chunk dict the routes built before pre-rendering (the reference bytes)."""
    return {"id": RID, "object": obj, "created": 1700000000, "model": MODEL,
            "choices": [{"index": i} | choice]}  # fmt: skip


@given(text=st.text(), index=st.integers(0, 99), finish=st.sampled_from([None, "stop", "length"]))
def test_rendered_chunks_are_the_bytes_json_dumps_gives(
    text: str, index: int, finish: str | None
) -> None:
    completion = _CompletionChunks(RID, 1700000000, MODEL)
    want = old_chunk("text_completion", index,
                     {"text": text, "logprobs": None, "finish_reason": finish})  # fmt: skip
    assert completion.choice(index, text, finish) == sse(want)
    chat = _ChatChunks(RID, 1700000000, MODEL)
    first = {"role": "assistant"} | ({"content": text} if text else {})
    want = old_chunk("chat.completion.chunk", index,
                     {"delta": first, "logprobs": None, "finish_reason": finish})  # fmt: skip
    assert chat.choice(index, text, finish) == sse(want)
    later = {"content": text} if text or finish is None else {}
    want = old_chunk("chat.completion.chunk", index,
                     {"delta": later, "logprobs": None, "finish_reason": finish})  # fmt: skip
    assert chat.choice(index, text, finish) == sse(want)
    usage = Usage(prompt_tokens=3, completion_tokens=len(text), total_tokens=3 + len(text))
    want = old_chunk("text_completion", None, {}) | {
        "choices": [],
        "usage": usage.model_dump(),
    }
    assert completion.usage(usage) == sse(want)


def post_stepped(engine: StepEngine, body: dict[str, Any], steps: int) -> list[bytes]:
    """The body writes of one streamed request while ``engine`` runs ``steps`` steps."""

    async def go() -> list[bytes]:
        app = create_app(config(cache={"enabled": False}), engines={"lm": engine})
        writes: list[bytes] = []
        async with client(app):
            call = asyncio.create_task(asgi_post(app, STREAM | body, writes))
            await run_steps(engine, call, body.get("n", 1), steps)
        return writes

    return run(go())


def test_choices_ready_together_go_out_in_one_write_of_separate_events() -> None:
    writes = post_stepped(StepEngine(), {"n": 3, "max_tokens": 3}, steps=3)
    assert len(writes) == 3  # one per step, not one per event
    for step, write in enumerate(writes, start=1):
        tokens = [e for e in sse_events(write.decode()) if e != "[DONE]" and e["choices"]]
        assert [e["choices"][0]["index"] for e in tokens] == [0, 1, 2]
        assert {e["choices"][0]["text"] for e in tokens} == {f"t{step} "}
    last = sse_events(writes[-1].decode())
    assert last[-1] == "[DONE]" and last[-2]["usage"]["completion_tokens"] == 9


def test_the_last_token_usage_and_done_share_one_write() -> None:
    first, last = post_stepped(StepEngine(), {"max_tokens": 2}, steps=2)
    assert [e["choices"][0]["text"] for e in sse_events(first.decode())] == ["t1 "]
    events = sse_events(last.decode())
    assert events[0]["choices"][0] == {"index": 0, "text": "t2 ", "logprobs": None,
                                       "finish_reason": "length"}  # fmt: skip
    assert events[1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert events[2] == "[DONE]" and len(events) == 3


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_that_ends_without_finishing_becomes_an_error_event(n: int) -> None:
    writes = post_stepped(StepEngine(end_early=1), {"n": n, "max_tokens": 5}, steps=2)
    events = sse_events(b"".join(writes).decode())
    assert [e["choices"][0]["text"] for e in events[:n]] == ["t1 "] * n
    err = events[-1]["error"]
    assert err["code"] == "engine_error" and "ended early" in err["message"]
    assert "[DONE]" not in events and len(events) == n + 1


def test_single_choice_stream_is_cancelled_in_the_engine_on_disconnect() -> None:
    engine = StepEngine()

    async def go() -> list[bytes]:
        app = create_app(config(cache={"enabled": False}), engines={"lm": engine})
        writes: list[bytes] = []
        gone = asyncio.Event()
        async with client(app):
            call = asyncio.create_task(asgi_post(app, STREAM | {"max_tokens": 50}, writes, gone))
            while not engine.live:
                await asyncio.sleep(0.001)
            for _ in range(2):
                engine.step()
                await settle()
            gone.set()
            await asyncio.wait_for(call, 5)
        return writes

    writes = run(go())
    assert len(writes) == 2 and engine.cancelled == [engine.requests[0].request_id]
    assert not engine.live


def test_openai_client_reads_coalesced_chunks_and_raises_on_an_error_event() -> None:
    async def go() -> tuple[list[Any], list[str]]:
        app = create_app(config(cache={"enabled": False}), engines={"lm": FakeEngine()})
        async with client(app) as c:  # no delay: all choices' events are ready at once
            oai = openai.AsyncOpenAI(base_url="http://kiln/v1", api_key="x", http_client=c,
                                     max_retries=0)  # fmt: skip
            usage = {"include_usage": True}
            stream = await oai.completions.create(model="lm", prompt="x", n=2, max_tokens=3,
                                                  stream=True, stream_options=usage)  # fmt: skip
            chunks = [chunk async for chunk in stream]
        failing = StepEngine(fail_at=2)
        app = create_app(config(cache={"enabled": False}), engines={"lm": failing})
        texts: list[str] = []
        async with client(app) as c:
            oai = openai.AsyncOpenAI(base_url="http://kiln/v1", api_key="x", http_client=c,
                                     max_retries=0)  # fmt: skip

            async def read() -> None:
                stream = await oai.completions.create(model="lm", prompt="x", max_tokens=5,
                                                      stream=True)  # fmt: skip
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)

            reader = asyncio.create_task(read())
            with pytest.raises(openai.APIError, match="blew up"):
                await run_steps(failing, reader, 1, 2)
        return chunks, texts

    chunks, texts = run(go())
    tokens = [c for c in chunks if c.choices]
    assert len(tokens) == 6 and all(len(c.choices) == 1 for c in tokens)
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in tokens if c.choices[0].index == i) == "t0 t1 t2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert texts == ["t1 "]


def test_disconnect_over_real_http_cancels_the_single_choice_stream() -> None:
    engine = FakeEngine(delay=0.01, max_model_len=10_000)
    server = ModelServer(config=config(port=0, cache={"enabled": False}), engines={"lm": engine})
    url = server.start(timeout=60)
    try:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(STREAM | {"max_tokens": 5000}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
            sock.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"data: " not in received and (more := sock.recv(65536)):
                received += more
            assert b"data: " in received, received
        deadline = time.monotonic() + 5
        while not engine.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cancelled == [engine.requests[0].request_id]
        assert httpx.get(url + "/ready").status_code == 200
    finally:
        server.stop()
