"""The plug-in contract of the server with toy plug-ins: observers, authenticator, guards,
extra routers, collectors and model checks (modelkiln.contract.serving)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, Request
from http_helpers import (
    FakeEngine,
    client,
    config,
    encoder_spec,
    metric,
    run,
    sse_events,
    tiny_encoder_dir,
)

from modelkiln.contract.serving import (
    RequestRecord,
    RequestRejected,
    ServeHooks,
    merge_hooks,
)
from modelkiln.errors import KilnError, ServingError
from modelkiln.serve import create_app
from modelkiln.serve.hooks import ObserverHub


class Collect:
    """Observer: keeps every record, and on which thread it came."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.threads: set[str] = set()
        self.closed = False

    def observe(self, record: RequestRecord) -> None:
        self.threads.add(threading.current_thread().name)
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


class Token:
    """Authenticator: ``Bearer admin`` / ``Bearer user`` are callers, anything else 401."""

    def authenticate(self, request: Request) -> Any:
        header = request.headers.get("authorization", "")
        who = header.removeprefix("Bearer ")
        if who not in ("admin", "user"):
            raise RequestRejected(401, "bad token", code="invalid_api_key", reason="unauthorized")
        scopes = frozenset({"admin"}) if who == "admin" else frozenset({"infer"})
        return SimpleNamespace(subject=who, scopes=scopes)


class Budget:
    """Guard: refuses model 'lm' to 'user' above ``limit`` tokens, says what is left."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: list[tuple[str | None, str, str, int]] = []

    def admit(self, principal: Any, model: str, route: str, tokens: int) -> Mapping[str, str]:
        self.calls.append((getattr(principal, "subject", None), model, route, tokens))
        if tokens > self.limit:
            raise RequestRejected(
                429, f"{tokens} tokens exceed {self.limit}", code="rate_limited",
                headers={"Retry-After": "7"},
            )  # fmt: skip
        return {"x-ratelimit-remaining-tokens": str(self.limit - tokens)}


def requests_with(
    hooks: ServeHooks, calls: list[tuple[str, str, dict[str, Any] | None]], **kw: Any
) -> tuple[list[httpx.Response], Any]:
    """Send ``(method, path, json)`` calls; return the responses and the app's state."""

    async def go() -> tuple[list[httpx.Response], Any]:
        app = create_app(config(**kw), engines={"lm": FakeEngine()}, hooks=hooks)
        headers = {"Authorization": "Bearer admin"} if hooks.authenticator else {}
        async with client(app, headers=headers) as c:
            out = [await c.request(m, p, json=b) for m, p, b in calls]
            assert app.state.kiln.observers.flush(10)
        return out, app.state.kiln

    return run(go())


STREAM = {"stream": True}


def test_observers_see_every_request_off_the_request_thread() -> None:
    seen = Collect()
    calls = [
        ("POST", "/v1/completions", {"model": "lm", "prompt": "a b", "max_tokens": 3, "n": 2}),
        ("POST", "/v1/completions", {"model": "lm", "prompt": "a b", "max_tokens": 4} | STREAM),
        ("POST", "/inference", {"model": "lm", "text": "a", "max_length": 2, "temperature": 0}),
        ("POST", "/inference", {"model": "lm", "text": "a", "max_length": 2, "temperature": 0}),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "a"}),
        ("GET", "/health", None),
    ]
    responses, state = requests_with(ServeHooks(observers=[seen]), calls)
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 200]
    assert sse_events(responses[1].text)[-1] == "[DONE]"
    assert state.observers.close() is None and seen.closed
    plain, streamed, fresh, hit, missing = seen.records  # /health is not a model route
    assert seen.threads == {"kiln-observers"}
    assert (plain.route, plain.status, plain.model, plain.stream) == (
        "/v1/completions", 200, "lm", False,
    )  # fmt: skip
    assert plain.input_bytes == 3 and plain.output_tokens == 6 and len(plain.outputs) == 2
    assert plain.input_tokens == len(plain.prompt_ids[0]) > 0 and plain.latency_s > 0
    assert [o.finish_reason for o in plain.outputs] == ["length", "length"]
    assert streamed.stream and streamed.output_tokens == 4  # counted at the stream's end
    assert (fresh.cached, hit.cached) == (False, True)
    assert hit.output_tokens == fresh.output_tokens == 2 and hit.input_tokens > 0
    assert (missing.status, missing.model) == (404, "")
    assert plain.principal is None  # auth off


def test_embedding_records_carry_the_vectors() -> None:
    seen = Collect()

    async def go() -> list[httpx.Response]:
        app = create_app(config(models=[encoder_spec()]), hooks=ServeHooks(observers=[seen]))
        async with client(app) as c:
            body = {"model": "enc", "input": ["def add x y", "hello"], "dimensions": 4}
            out = [await c.post("/v1/embeddings", json=body) for _ in range(2)]
            assert app.state.kiln.observers.flush(10)
            return out

    first, second = run(go())
    assert first.status_code == second.status_code == 200
    record, cached = seen.records
    assert record.input_tokens == first.json()["usage"]["prompt_tokens"]
    assert record.input_bytes == len("def add x y") + len("hello")
    vectors = np.stack([o.embedding for o in record.outputs])
    assert vectors.shape[0] == 2 and vectors.shape[1] > 4  # full width, not the truncation
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cached.cached and not cached.outputs


USER = {"Authorization": "Bearer user"}


def test_a_plugged_authenticator_guards_every_route_but_the_probes() -> None:
    seen = Collect()
    hooks = ServeHooks(observers=[seen], authenticator=Token())

    async def go() -> list[httpx.Response]:
        app = create_app(config(), engines={"lm": FakeEngine()}, hooks=hooks)
        async with client(app) as c:
            body = {"model": "lm", "prompt": "a", "max_tokens": 1}
            out = [
                await c.get("/health"),
                await c.post("/v1/completions", json=body),
                await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer x"}),
                await c.post("/v1/completions", json=body, headers=USER),
                await c.get("/admin/adapters", headers=USER),
                await c.get("/admin/adapters", headers={"Authorization": "Bearer admin"}),
                await c.get("/metrics", headers=USER),
            ]
            assert app.state.kiln.observers.flush(10)
            return out

    health, none, bad, user, admin_as_user, admin, metrics = run(go())
    assert health.status_code == 200
    assert none.status_code == bad.status_code == 401
    assert bad.json()["error"] == {
        "message": "bad token", "type": "authentication_error", "param": None,
        "code": "invalid_api_key",
    }  # fmt: skip
    assert user.status_code == 200
    assert admin_as_user.status_code == 403 and admin.status_code == 200
    assert metric(metrics.text, "ml_rejections_total", reason="unauthorized") == 2
    assert [(r.status, r.principal) for r in seen.records if r.route == "/v1/completions"] == [
        (401, None), (401, None), (200, "user"),
    ]  # fmt: skip


def test_guards_refuse_before_the_cache_and_add_their_headers() -> None:
    budget = Budget(limit=40)
    body = {"model": "lm", "prompt": "a b", "max_tokens": 3, "temperature": 0}
    calls = [
        ("POST", "/v1/completions", body),
        ("POST", "/v1/completions", body),  # a cache hit: still guarded
        ("POST", "/v1/completions", body | {"max_tokens": 100}),
    ]
    (ok, hit, over), _ = requests_with(ServeHooks(guards=[budget]), calls)
    assert ok.status_code == hit.status_code == 200
    left = int(ok.headers["x-ratelimit-remaining-tokens"])
    assert left == int(hit.headers["x-ratelimit-remaining-tokens"]) and 0 < left < 40
    assert over.status_code == 429 and over.headers["retry-after"] == "7"
    assert over.json()["error"]["code"] == "rate_limited"
    assert [c[:3] for c in budget.calls] == [(None, "lm", "/v1/completions")] * 3


def test_extra_routers_and_collectors_join_the_app() -> None:
    from prometheus_client.core import GaugeMetricFamily

    router = APIRouter()

    @router.get("/v1/toy")
    async def toy(request: Request) -> dict[str, Any]:
        return {"principal": request.state.principal.subject}

    class Drift:
        def collect(self) -> Any:
            yield GaugeMetricFamily("ml_toy_drift", "toy", value=0.25)

    hooks = ServeHooks(authenticator=Token(), routers=[router], collectors=[Drift()])
    calls: list[tuple[str, str, Any]] = [("GET", "/v1/toy", None), ("GET", "/metrics", None)]
    (toy_r, metrics), _ = requests_with(hooks, calls)
    assert toy_r.json() == {"principal": "admin"}
    assert metric(metrics.text, "ml_toy_drift") == 0.25


def test_a_model_check_refuses_a_model_before_it_loads(tmp_path: Any) -> None:
    checked: list[str] = []

    def refuse(path: Any) -> None:
        checked.append(path.name)
        raise KilnError(f"'{path}' is not signed", hint="sign it with kiln sign")

    async def go() -> Any:
        app = create_app(config(models=[encoder_spec()]), hooks=ServeHooks(model_checks=[refuse]))
        async with client(app, ready=False):
            for _ in range(1000):  # loading fails on a worker thread: wait for it (bounded)
                if app.state.kiln.load_error is not None:
                    break
                await asyncio.sleep(0.01)
            return app.state.kiln

    state = run(go())
    assert "is not signed" in str(state.load_error) and not state.ready and len(checked) == 1


def test_the_hub_drops_when_full_and_survives_a_failing_observer() -> None:
    class Broken:
        def observe(self, record: RequestRecord) -> None:
            raise RuntimeError("plug-in bug")

    seen = Collect()
    hub = ObserverHub([Broken(), seen], max_pending=2)
    record = RequestRecord("/v1/x", "POST", 200, 0.1, 0.0)
    gate = threading.Event()
    real = seen.observe
    seen.observe = lambda r: (gate.wait(5), real(r))  # type: ignore[method-assign]
    for _ in range(6):
        hub.emit(record)
    gate.set()
    assert hub.flush(5)
    assert 2 <= len(seen.records) < 6 and hub.dropped == 6 - len(seen.records)
    assert hub.failed == len(seen.records)
    dropped, errors = hub.collect()
    assert dropped.samples[0].value == hub.dropped and errors.samples[0].value == hub.failed
    hub.close()
    hub.emit(record)  # after close: ignored
    assert len(seen.records) == 6 - hub.dropped


def test_merge_hooks_joins_lists_and_allows_one_authenticator() -> None:
    a = ServeHooks(observers=[Collect()], uvicorn_options={"ssl_certfile": "c"})
    b = ServeHooks(guards=[Budget(1)], authenticator=Token())
    merged = merge_hooks(a, None, b)
    assert len(merged.observers) == len(merged.guards) == 1 and merged.authenticator is not None
    assert merged.uvicorn_options == {"ssl_certfile": "c"} and not merged.wants_logprobs
    with pytest.raises(ServingError, match="authenticator"):
        merge_hooks(b, ServeHooks(authenticator=Token()))


def test_an_observer_that_wants_logprobs_gets_the_mean_per_choice() -> None:
    class Scores(Collect):
        wants_logprobs = True

    scores, plain = Scores(), Collect()
    body = {"model": "lm", "prompt": "a", "max_tokens": 3, "n": 2}
    for observer in (plain, scores):
        requests_with(ServeHooks(observers=[observer]), [("POST", "/v1/completions", body)])

    def means(seen: Collect) -> list[tuple[float | None, float | None]]:
        return [(o.mean_logprob, o.mean_entropy) for o in seen.records[0].outputs]

    assert means(plain) == [(None, None)] * 2
    # the fake engine scores token i as -0.5 * (i + 1): mean over 3 tokens = -1.0
    assert means(scores) == [(-1.0, 1.0)] * 2


def test_a_model_loader_serves_a_directory_without_readable_weights(tmp_path: Any) -> None:
    """Like encrypted weights: config + tokenizer on disk, the model comes from the loader."""
    import shutil

    from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

    from modelkiln.serve.generation.backend import TorchCausalLMBackend

    sealed = tmp_path / "sealed"
    shutil.copytree(tiny_encoder_dir(), sealed)
    for weights in sealed.glob("*.safetensors"):
        weights.unlink()
    asked: list[str] = []

    def loader(path: Any) -> Any:
        asked.append(path.name)
        return AutoModel.from_pretrained(tiny_encoder_dir()) if path == sealed else None

    async def go(spec: dict[str, Any], hooks: ServeHooks | None) -> list[float]:
        app = create_app(config(models=[spec]), hooks=hooks)
        async with client(app) as c:
            r = await c.post("/v1/embeddings", json={"model": "enc", "input": "def add x y"})
            return list(r.json()["data"][0]["embedding"])

    plain = run(go(encoder_spec(), None))
    via_loader = run(go(encoder_spec() | {"path": str(sealed)}, ServeHooks(model_loader=loader)))
    np.testing.assert_allclose(via_loader, plain, atol=1e-6)
    assert asked == ["sealed"]
    lm_dir = tmp_path / "lm"
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=64)
    model = GPT2LMHeadModel(cfg).eval()
    cfg.save_pretrained(lm_dir)  # config only: no weights on disk
    backend = TorchCausalLMBackend.from_path(lm_dir, precision="fp32", loader=lambda p: model)
    assert backend.model is model
