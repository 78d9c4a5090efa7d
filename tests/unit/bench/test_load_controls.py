"""The load generator's controls against real loopback servers: stopping a run early
(``until``), a model per request (``(model, prompt)`` pairs), unstreamed completions
(``stream=False``), and 200 answers without the body of their kind counted as errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from http_helpers import FakeEngine, run, tiny_encoder_dir

from modelkiln.bench import LoadReport, run_load, run_load_async
from modelkiln.bench.serving import make_config, run_serve_bench
from modelkiln.errors import ConfigError
from modelkiln.serve import ModelServer, ServeConfig


@pytest.fixture(scope="module")
def engines() -> dict[str, FakeEngine]:
    return {"lm": FakeEngine(delay=0.01, max_model_len=4096),
            "lm2": FakeEngine(delay=0.01, max_model_len=4096)}  # fmt: skip


@pytest.fixture(scope="module")
def url(engines: dict[str, FakeEngine]) -> Iterator[str]:
    models = [{"path": "fake", "name": "lm"}, {"path": "fake", "name": "lm2"},
              {"path": str(tiny_encoder_dir()), "name": "enc"}]  # fmt: skip
    cfg = ServeConfig.model_validate({"models": models, "port": 0, "cache": {"enabled": False}})
    server = ModelServer(config=cfg, engines=dict(engines))
    yield server.start(timeout=60)
    server.stop()


# ------------------------------------------------------------------------------ stop early
def test_until_from_another_thread_stops_sending_and_awaits_the_requests_in_flight(
    url: str,
) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)  # mid-way through the first requests (~0.5 s each)
    timer.start()
    t0 = time.perf_counter()
    report = run_load(url, ["a b"], model="lm", concurrency=3, num_requests=1000, max_tokens=50,
                      until=stop.is_set)  # fmt: skip
    took = time.perf_counter() - t0
    timer.join()
    # The three requests in flight at the stop ran to their end and are in the report.
    assert len(report.results) == 3 and report.meta["stopped_early"] is True
    assert all(r.ok and r.completion_tokens == 50 for r in report.results)
    assert report.client_cpu_s is not None and report.duration_s >= 0.45 and took < 5
    assert report.summary()["ok"] == 3


def test_until_stops_an_open_loop_between_sends_and_the_report_is_whole(url: str) -> None:
    async def go() -> tuple[LoadReport, float]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, stop.set)
        t0 = time.perf_counter()
        # 5 requests/s, constant: sends at 0.2, 0.4, 0.6 s ... and a 60 s duration.
        rep = await run_load_async(url, ["x"], model="lm", rate=5.0, arrival="constant",
                                   duration_s=60, max_tokens=30, until=stop.is_set)  # fmt: skip
        return rep, time.perf_counter() - t0

    report, took = run(go())
    # Stopped at 0.5 s: no request due after it was sent; each one sent ran to its end.
    assert 1 <= len(report.results) <= 2 and report.meta["stopped_early"] is True
    assert all(r.ok and r.completion_tokens == 30 for r in report.results)
    assert took < 3  # not the 60 s duration


def test_until_alone_ends_a_run_and_an_unfired_until_changes_nothing(url: str) -> None:
    calls = 0

    def after_four() -> bool:
        nonlocal calls
        calls += 1
        return calls > 4

    report = run_load(url, ["x"], model="lm", concurrency=1, max_tokens=2, until=after_four)
    assert len(report.results) == 4 and all(r.ok for r in report.results)
    plain = run_load(url, ["x"], model="lm", concurrency=2, num_requests=4, max_tokens=2,
                     until=lambda: False)  # fmt: skip
    assert len(plain.results) == 4 and "stopped_early" not in plain.meta
    with pytest.raises(ConfigError, match="num_requests or duration_s"):
        run_load(url, ["x"], model="lm", concurrency=2)


# ------------------------------------------------------------------- a model per request
def test_model_prompt_pairs_reach_their_models_request_by_request(
    url: str, engines: dict[str, FakeEngine]
) -> None:
    before = {name: len(e.requests) for name, e in engines.items()}
    pairs = [("lm", "a"), ("lm2", "b b"), ("lm", "c c c"), ("lm2", "d d d d")]
    report = run_load(url, pairs, concurrency=1, num_requests=8, max_tokens=2)
    assert len(report.results) == 8 and all(r.ok for r in report.results)
    got = {name: [len(r.prompt_ids) for r in e.requests[before[name]:]]
           for name, e in engines.items()}  # fmt: skip
    lm_lens = [len(engines["lm"].tokenizer.encode(p)) for p in ("a", "c c c")]
    lm2_lens = [len(engines["lm2"].tokenizer.encode(p)) for p in ("b b", "d d d d")]
    assert got["lm"] == lm_lens * 2 and got["lm2"] == lm2_lens * 2
    # A plain prompt list still goes to ``model``; a pair overrides it for its request.
    mixed = run_load(url, ["x", ("nope", "y")], model="lm", concurrency=1, num_requests=2,
                     max_tokens=2)  # fmt: skip
    assert mixed.results[0].ok and "model_not_found" in (mixed.results[1].error or "")
    with pytest.raises(ConfigError, match="model, prompt"):
        run_load(url, [("lm", "a", "extra")], concurrency=1, num_requests=1)  # type: ignore[list-item]


# ------------------------------------------------------------------ unstreamed completions
def test_stream_false_gets_one_json_answer_and_records_latency_only(url: str) -> None:
    report = run_load(url, ["a b", "c"], model="lm", concurrency=2, num_requests=4, max_tokens=5,
                      stream=False)  # fmt: skip
    for r in report.results:
        assert r.ok and r.latency >= 0.04  # the engine sleeps 10 ms per token
        assert r.ttft is None and r.itl == [] and r.tpot is None
        assert r.completion_tokens == 5  # from the answer's usage
    s = report.summary()
    assert s["ok"] == 4 and s["ttft_p50_ms"] is None and s["latency_p50_ms"] > 0
    assert s["output_tokens"] == 20


def test_serve_bench_no_stream_and_its_slo_check(url: str) -> None:
    res = run_serve_bench(make_config(url=url, model="lm", concurrency=1, requests=2,
                                      max_tokens=2, stream=False, slo="e2e_p99=10s"))  # fmt: skip
    assert res["summary"]["ok"] == 2 and res["summary"]["ttft_p50_ms"] is None
    assert res["slo"]["met"] and res["summary"]["goodput_rps"] > 0
    with pytest.raises(ConfigError, match="--no-stream"):
        run_serve_bench(make_config(url=url, concurrency=1, requests=1, stream=False,
                                    slo="ttft_p95=1s"))  # fmt: skip


# ----------------------------------------------------- scripted answers: bodies and checks
class Recorder:
    """A loopback HTTP/1.1 server answering each request with the next of ``answers``
    (bodies, sent with Content-Length in pieces of ``piece`` bytes); records request bodies."""

    def __init__(self, answers: list[bytes], piece: int = 1 << 20) -> None:
        self.answers = answers
        self.piece = piece
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.bodies.append(json.loads(await reader.readexactly(length)))
                body = self.answers[(len(self.bodies) - 1) % len(self.answers)]
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body))  # fmt: skip
                for i in range(0, len(body), self.piece):
                    writer.write(body[i : i + self.piece])
                    await writer.drain()
                    await asyncio.sleep(0.001)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def load(self, **kwargs: Any) -> LoadReport:
        async def go() -> LoadReport:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            args: dict[str, Any] = {"model": "m", "concurrency": 1}
            async with server:
                return await run_load_async(f"http://127.0.0.1:{port}", ["p"], **args | kwargs)

        return run(go())


def test_an_embeddings_200_without_an_embedding_is_an_error() -> None:
    good = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":"AAAAAA=="}]}'
    spaced = b'{"data": [{"object": "embedding", "embedding": [0.1, 0.2]}]}'
    empty = b'{"object":"list","data":[],"model":"m"}'
    no_vector = b'{"object":"list","data":[{"object":"embedding","index":0}]}'
    rec = Recorder([good, spaced, empty, no_vector], piece=5)  # keys cut across reads
    report = rec.load(kind="embeddings", num_requests=4)
    ok, ok2, bad, bad2 = report.results
    assert ok.ok and ok2.ok and ok.ttft == ok.latency
    for r in (bad, bad2):
        assert r.status == 200 and not r.ok and r.ttft is None
        assert r.error is not None and 'without an "embedding"' in r.error
    assert '"data":[]' in (bad.error or "")
    s = report.summary()
    assert s["ok"] == 2 and s["errors"] == 2 and "embedding" in s["first_error"]


def test_stream_false_sends_an_unstreamed_body_and_checks_the_answer() -> None:
    answer = b'{"id":"c","choices":[{"index":0,"text":"x y"}],"usage":{"completion_tokens":2}}'
    no_usage = b'{"id":"c","choices":[{"index":0,"text":"x"}]}'
    rec = Recorder([answer, no_usage, b"{}", b"not json"], piece=7)
    report = rec.load(num_requests=4, max_tokens=2, stream=False)
    body = rec.bodies[0]
    assert body["stream"] is False and "stream_options" not in body and body["model"] == "m"
    a, b, c, d = report.results
    assert a.ok and a.completion_tokens == 2 and a.ttft is None and a.latency > 0
    assert b.ok and b.completion_tokens == 0
    for r in (c, d):
        assert not r.ok and "no choices" in (r.error or "")
    chat = Recorder([b'{"choices":[{"index":0,"message":{"role":"assistant","content":"x"}}]}'])
    assert chat.load(kind="chat", num_requests=1, stream=False).results[0].ok
    assert chat.bodies[0]["stream"] is False and chat.bodies[0]["messages"][0]["content"] == "p"
    default = Recorder([answer])
    default.load(num_requests=1)
    assert default.bodies[0]["stream"] is True
    assert default.bodies[0]["stream_options"] == {"include_usage": True}
