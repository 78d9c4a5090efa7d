"""Generation routes over ASGI with a scripted engine: completions, streaming, FIM, chat,
/inference, cache, limits, deadlines."""

from __future__ import annotations

from typing import Any

import httpx
from http_helpers import (
    FakeEngine,
    client,
    code_tokenizer,
    config,
    metric,
    run,
    sse_events,
    tiny_encoder_dir,
)

from modelkiln.serve import create_app


def call(engine: FakeEngine, path: str, body: dict[str, Any], **cfg: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        app = create_app(config(**cfg), engines={"lm": engine})
        async with client(app) as c:
            return await c.post(path, json=body)

    return run(go())


def test_completion_returns_text_usage_and_choices_in_openai_order() -> None:
    engine = FakeEngine()
    r = call(
        engine, "/v1/completions", {"model": "lm", "prompt": ["a b", "c"], "n": 2, "max_tokens": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {"t0 t1 t2 "}
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    prompt_lens = [len(r.prompt_ids) for r in engine.requests]
    assert prompt_lens[0] == prompt_lens[1] and len(engine.requests) == 4
    usage = body["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] == prompt_lens[0] + prompt_lens[2]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12


def test_sampling_options_reach_the_engine_and_seeds_differ_per_choice() -> None:
    engine = FakeEngine()
    body = {"model": "lm", "prompt": [5, 6, 7], "n": 2, "max_tokens": 4, "temperature": 0.5,
            "top_p": 0.9, "top_k": 7, "seed": 11, "stop": ["t2"]}  # fmt: skip
    r = call(engine, "/v1/completions", body)
    assert r.status_code == 200, r.text
    params = [req.params for req in engine.requests]
    assert [p.seed for p in params] == [11, 12]
    assert params[0].stop == ("t2",) and params[0].top_k == 7 and params[0].top_p == 0.9
    assert engine.requests[0].prompt_ids == [5, 6, 7]
    assert r.json()["choices"][0] == {"index": 0, "text": "t0 t1 ", "logprobs": None,
                                      "finish_reason": "stop"}  # fmt: skip


def test_streaming_sends_sse_chunks_usage_and_done() -> None:
    body = {"model": "lm", "prompt": "x", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = call(FakeEngine(), "/v1/completions", body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "t0 t1 t2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 3 and events[-2]["choices"] == []


def test_suffix_builds_a_fim_prompt_or_is_refused_without_fim_tokens() -> None:
    engine = FakeEngine()
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": "def f(", "suffix": "\n"})
    assert r.status_code == 200, r.text
    tok = engine.tokenizer
    ids = engine.requests[0].prompt_ids
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<fim_prefix>"] and ids[-1] == vocab["<fim_middle>"]
    assert vocab["<fim_suffix>"] in ids

    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_encoder_dir()))  # WordPiece: no FIM tokens
    r = call(FakeEngine(plain), "/v1/completions", {"model": "lm", "prompt": "a", "suffix": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "<fim_prefix>" in r.json()["error"]["message"]


def test_chat_needs_a_chat_template() -> None:
    msg = {"model": "lm", "messages": [{"role": "user", "content": "hi"}]}
    r = call(FakeEngine(code_tokenizer()), "/v1/chat/completions", msg)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and "chat template" in err["message"]

    engine = FakeEngine(code_tokenizer(chat=True))
    r = call(engine, "/v1/chat/completions", msg | {"max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "t0 t1 "}
    prompt = engine.tokenizer.decode(engine.requests[0].prompt_ids)
    assert prompt == "<user>hi\n<assistant>"


def test_chat_streaming_starts_with_the_role() -> None:
    msg = {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "stream": True,
           "max_completion_tokens": 2}  # fmt: skip
    r = call(FakeEngine(code_tokenizer(chat=True)), "/v1/chat/completions", msg)
    events = sse_events(r.text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "t0 t1 "
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


def test_inference_route_answers_with_the_handbook_fields() -> None:
    r = call(
        FakeEngine(), "/inference", {"text": "def", "max_length": 4, "num_return_sequences": 2}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generated_text"] == ["t0 t1 t2 t3 "] * 2
    assert body["tokens_generated"] == 8
    assert body["inference_time_ms"] >= 0 and body["tokens_per_second"] >= 0


def test_greedy_requests_are_cached_and_sampled_ones_are_not() -> None:
    engine = FakeEngine()

    async def go() -> tuple[list[httpx.Response], str]:
        app = create_app(config(), engines={"lm": engine})
        async with client(app) as c:
            greedy = {"model": "lm", "prompt": "abc", "max_tokens": 2, "temperature": 0}
            out = [await c.post("/v1/completions", json=greedy) for _ in range(2)]
            sampled = greedy | {"temperature": 0.8}
            out += [await c.post("/v1/completions", json=sampled) for _ in range(2)]
            return out, (await c.get("/metrics")).text

    responses, metrics = run(go())
    assert all(r.status_code == 200 for r in responses)
    assert len(engine.requests) == 3  # the second greedy call came from the cache
    assert responses[0].json()["choices"] == responses[1].json()["choices"]
    assert responses[0].json()["id"] != responses[1].json()["id"]
    assert metric(metrics, "ml_cache_hits_total", model_name="lm") == 1
    assert metric(metrics, "ml_cache_misses_total", model_name="lm") == 1


def test_prompt_limits_give_400_with_the_openai_shape() -> None:
    engine = FakeEngine(max_model_len=16)
    long_prompt = {"model": "lm", "prompt": list(range(5, 25)), "max_tokens": 1}
    r = call(engine, "/v1/completions", long_prompt)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": [5, 6], "max_tokens": 15})
    assert r.status_code == 400 and "maximum context length is 16" in r.json()["error"]["message"]
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": [10**6]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": []})
    assert r.status_code == 400
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": "x", "logprobs": 2})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
    assert engine.requests == []


def test_deadline_gives_504() -> None:
    engine = FakeEngine(delay=0.05)
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 50},
             request_timeout_s=0.1)  # fmt: skip
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"


def test_empty_text_prompt_starts_from_bos() -> None:
    engine = FakeEngine()
    r = call(engine, "/v1/completions", {"model": "lm", "prompt": "", "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert engine.requests[0].prompt_ids == [engine.tokenizer.bos_token_id]
