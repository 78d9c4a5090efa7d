"""HTTP contract over ASGI: error shapes and statuses, auth, admission (429), readiness,
draining, metrics, OpenAPI, and the public API of modelkiln.serve."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from http_helpers import FakeEngine, client, config, metric, run

import modelkiln.serve
from modelkiln.serve import create_app
from modelkiln.serve.config import API_KEYS_ENV
from modelkiln.serve.metrics import REQUEST_BUCKETS

COMPLETION = {"model": "lm", "prompt": "x", "max_tokens": 2}


def requests(
    calls: list[tuple[str, str, Any]],
    engine: FakeEngine | None = None,
    headers: dict[str, str] | None = None,
    **cfg: Any,
) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        app = create_app(config(**cfg), engines={"lm": engine or FakeEngine()})
        async with client(app, headers=headers or {}) as c:
            out = []
            for method, path, body in calls:
                if isinstance(body, bytes):
                    json_type = {"content-type": "application/json"}
                    out.append(await c.request(method, path, content=body, headers=json_type))
                else:
                    out.append(await c.request(method, path, json=body))
            return out

    return run(go())


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_input_is_4xx_in_the_openai_shape_never_500() -> None:
    calls = [
        ("POST", "/v1/completions", b"{not json"),
        ("POST", "/v1/completions", COMPLETION | {"temprature": 0}),
        ("POST", "/v1/completions", {"prompt": "x"}),
        ("POST", "/v1/completions", COMPLETION | {"max_tokens": -1}),
        ("POST", "/v1/completions", COMPLETION | {"model": "gpt-4"}),
        ("POST", "/v1/completions", b"[1, 2]"),
        ("POST", "/v1/completions", COMPLETION | {"stop": ["a", "b", "c", "d", "e"]}),
        ("GET", "/v1/nothing", None),
        ("GET", "/v1/completions", None),
        ("POST", "/v1/embeddings", {"model": "lm", "input": "x"}),
        ("POST", "/v1/completions", COMPLETION | {"presence_penalty": 1.0}),
    ]
    out = requests(calls)
    err = assert_openai_error(out[0], 400)
    assert "not valid JSON" in err["message"]
    assert assert_openai_error(out[1], 400)["param"] == "temprature"
    assert assert_openai_error(out[2], 400)["param"] == "model"
    assert assert_openai_error(out[3], 400)["param"] == "max_tokens"
    err = assert_openai_error(out[4], 404)
    assert err["code"] == "model_not_found" and "lm" in err["message"]
    assert "JSON object" in assert_openai_error(out[5], 400)["message"]
    assert "at most 4" in assert_openai_error(out[6], 400)["message"]
    assert assert_openai_error(out[7], 404)["type"] == "not_found_error"
    assert_openai_error(out[8], 405)
    assert_openai_error(out[9], 400)
    assert "presence_penalty" in assert_openai_error(out[10], 400)["message"]


def test_oversized_body_is_413() -> None:
    big = {"model": "lm", "prompt": "x" * 5000}
    r = requests([("POST", "/v1/completions", big)], max_body_bytes=2048)[0]
    assert assert_openai_error(r, 413)["code"] == "request_too_large"


def test_api_keys_guard_every_route_but_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEYS_ENV, "env-key")
    calls = [("GET", "/health", None), ("GET", "/ready", None), ("GET", "/v1/models", None),
             ("POST", "/v1/completions", COMPLETION), ("GET", "/metrics", None),
             ("GET", "/openapi.json", None)]  # fmt: skip
    anonymous = requests(calls, api_keys=["cfg-key"])
    assert [r.status_code for r in anonymous] == [200, 200, 401, 401, 401, 401]
    err = assert_openai_error(anonymous[2], 401)
    assert err["type"] == "authentication_error" and anonymous[2].headers["www-authenticate"]
    wrong = requests(calls[2:3], headers={"Authorization": "Bearer nope"}, api_keys=["cfg-key"])
    assert wrong[0].status_code == 401
    for key in ("cfg-key", "env-key"):
        ok = requests(calls, headers={"Authorization": f"Bearer {key}"}, api_keys=["cfg-key"])
        assert [r.status_code for r in ok] == [200] * 6


def test_full_queue_answers_429_with_retry_after_and_counts_rejections() -> None:
    engine = FakeEngine(delay=0.02)

    async def go() -> tuple[list[httpx.Response], str]:
        app = create_app(config(max_queued_requests=2), engines={"lm": engine})
        async with client(app) as c:
            body = COMPLETION | {"max_tokens": 5}
            rs = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))
            return list(rs), (await c.get("/metrics")).text

    responses, text = run(go())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert assert_openai_error(refused, 429)["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert len(engine.requests) == 2  # refused before reaching the engine
    assert metric(text, "ml_rejections_total", reason="queue_requests") == 4
    assert metric(text, "ml_requests_total", model_name="lm", status="429") == 4


def test_token_budget_refuses_big_requests_while_busy() -> None:
    engine = FakeEngine(delay=0.02)

    async def go() -> list[int]:
        app = create_app(config(max_queued_tokens=40), engines={"lm": engine})
        async with client(app) as c:
            small = c.post("/v1/completions", json=COMPLETION | {"max_tokens": 10})
            big = c.post("/v1/completions", json=COMPLETION | {"max_tokens": 35})
            rs = await asyncio.gather(small, big)
            return [r.status_code for r in rs]

    assert run(go()) == [200, 429]


def test_ready_is_503_while_loading_and_while_draining() -> None:
    async def go() -> None:
        engine = FakeEngine(start_delay=0.3)
        app = create_app(config(), engines={"lm": engine})
        async with client(app, ready=False) as c:
            loading = await c.get("/ready")
            assert loading.status_code == 503 and loading.json()["status"] == "loading"
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json=COMPLETION)
            assert assert_openai_error(r, 503)["code"] == "not_ready"
            assert await app.state.kiln.wait_ready(5)
            assert (await c.get("/ready")).json() == {"status": "ready", "models": ["lm"]}
            app.state.kiln.draining = True
            assert (await c.get("/ready")).status_code == 503
            r = await c.post("/v1/completions", json=COMPLETION)
            assert assert_openai_error(r, 503)["code"] == "draining"
        assert engine.stopped

    run(go())


def test_metrics_expose_the_handbook_names_and_buckets() -> None:
    out = requests([("POST", "/v1/completions", COMPLETION), ("GET", "/metrics", None)])
    text = out[1].text
    assert out[1].headers["content-type"].startswith("text/plain")
    assert metric(text, "ml_requests_total", model_name="lm", version="1", status="200") == 1
    for le in REQUEST_BUCKETS:
        assert f'ml_request_duration_seconds_bucket{{le="{le}",model_name="lm"' in text
    names = [
        "ml_time_to_first_token_seconds",
        "ml_inter_token_latency_seconds",
        "ml_tokens_total",
        "ml_engine_running",
        "ml_ready",
        "ml_cold_start_seconds",
    ]
    for name in names:
        assert name in text, name
    assert metric(text, "ml_tokens_total", model_name="lm", direction="out") == 2
    assert metric(text, "ml_time_to_first_token_seconds_count", model_name="lm") == 1
    assert metric(text, "ml_inter_token_latency_seconds_count", model_name="lm") == 1


def test_openapi_documents_every_route() -> None:
    paths = requests([("GET", "/openapi.json", None)])[0].json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
                 "/inference", "/health", "/ready", "/metrics"):  # fmt: skip
        assert path in paths


def test_public_api_is_pinned_and_light() -> None:
    assert modelkiln.serve.__all__ == [
        "ModelServer", "ModelSpec", "ServeConfig", "create_app", "load_serve_config", "serve",
    ]  # fmt: skip
    for name in modelkiln.serve.__all__:
        assert getattr(modelkiln.serve, name) is not None
    import subprocess
    import sys

    code = "import sys, modelkiln.serve; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
