"""Long completion prompts: refused with a 400 naming the limit, the length and the flag, or
cut to their last tokens that fit the context minus max_tokens (per request or server default)."""

from __future__ import annotations

from typing import Any

import httpx
from http_helpers import FakeEngine, client, config, run

from modelkiln.serve import create_app
from modelkiln.serve.truncation import fit_prompt

CONTEXT = 32
PROMPT = list(range(5, 45))  # 40 token ids: over the 32-token context


def call(path: str, body: dict[str, Any], **cfg: Any) -> tuple[httpx.Response, FakeEngine]:
    engine = FakeEngine(max_model_len=CONTEXT)

    async def go() -> httpx.Response:
        app = create_app(config(**cfg), engines={"lm": engine})
        async with client(app) as c:
            return await c.post(path, json=body)

    return run(go()), engine


def test_fit_prompt_keeps_the_last_tokens_and_leaves_room_for_max_tokens() -> None:
    kw: dict[str, Any] = {"context": 10, "max_input_tokens": 100, "model": "m"}
    assert fit_prompt(list(range(20)), max_tokens=4, truncate=True, **kw) == list(range(14, 20))
    assert fit_prompt(list(range(20)), max_tokens=None, truncate=True, **kw) == list(range(11, 20))
    assert fit_prompt([1, 2], max_tokens=4, truncate=False, **kw) == [1, 2]
    short = {"context": None, "max_input_tokens": 3, "model": "m"}
    assert fit_prompt([1, 2, 3, 4], max_tokens=5, truncate=True, **short) == [2, 3, 4]


def test_a_long_prompt_is_refused_by_default_naming_limit_length_and_flag() -> None:
    r, engine = call("/v1/completions", {"model": "lm", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    msg = err["message"]
    assert "40 tokens" in msg and "the limit is 28" in msg and '"truncate": true' in msg
    assert "--auto-truncate" in msg and "maximum context length is 32" in msg
    assert engine.requests == []


def test_truncate_true_keeps_the_last_tokens_and_usage_counts_them() -> None:
    body = {"model": "lm", "prompt": PROMPT, "max_tokens": 4, "truncate": True}
    r, engine = call("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert engine.requests[0].prompt_ids == PROMPT[-28:]
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 28 and usage["completion_tokens"] == 4


def test_the_server_default_truncates_and_a_request_can_refuse() -> None:
    r, engine = call("/v1/completions", {"model": "lm", "prompt": PROMPT, "max_tokens": 8},
                     auto_truncate=True)  # fmt: skip
    assert r.status_code == 200, r.text
    assert engine.requests[0].prompt_ids == PROMPT[-24:]
    assert r.json()["usage"]["prompt_tokens"] == 24
    r, _ = call("/v1/completions", {"model": "lm", "prompt": PROMPT, "max_tokens": 8,
                                    "truncate": False}, auto_truncate=True)  # fmt: skip
    assert r.status_code == 400 and "the limit is 24" in r.json()["error"]["message"]


def test_max_tokens_filling_the_context_is_refused_even_with_truncate() -> None:
    body = {"model": "lm", "prompt": PROMPT[:20], "max_tokens": CONTEXT, "truncate": True}
    r, engine = call("/v1/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and "lower max_tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"
    assert engine.requests == []
