"""The rollout gateway: an ASGI layer in front of the model server that runs several
versions of one model side by side under a traffic policy.

Each version is served by the server as its own model (``<name>.v<version>``);
clients keep asking for ``<name>``. Per request the gateway picks a version
(:func:`.policy.assign`: sticky ``X-User-Key`` / ``user``, ``X-Model-Version``
override, weighted split), rewrites the body's ``model``, records the outcome
per version for the controller, and mirrors a share to a shadow version whose
answer is compared and discarded. A request keeps its version for its whole
life, so after a blue-green switch in-flight requests and streams finish on the
old version. It also adds the versions and split to ``/v1/models``, the
rollout's own metrics to ``/metrics`` and serves ``/admin/rollout`` (admin key).

Plain ASGI on purpose: it wraps any ASGI app and imports nothing of the serve stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from modelkiln.errors import KilnError
from modelkiln.rollout.agreement import response_agreement
from modelkiln.rollout.controller import Controller
from modelkiln.rollout.faults import FaultInjector
from modelkiln.rollout.gateway_adapters import (
    is_startup_complete,
    load_adapters,
    ready_body,
    ready_error,
)
from modelkiln.rollout.gateway_http import json_response, read_body, replay
from modelkiln.rollout.metrics import RolloutMetrics
from modelkiln.rollout.names import served_name
from modelkiln.rollout.plan import RuntimeAdapters
from modelkiln.rollout.policy import (
    OVERRIDE_HEADER,
    Assignment,
    TrafficPolicy,
    assign,
    single,
)
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.spec import ACTIVE
from modelkiln.rollout.stages import policy_for

log = logging.getLogger(__name__)
MODEL_ROUTES = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/inference"}
)
ASGI = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class RolloutGateway:
    """ASGI app: version routing, shadowing, per-version records, rollout admin routes."""

    def __init__(
        self,
        app: ASGI,
        *,
        versions: dict[str, list[str]],
        serving: dict[str, str],
        controller_factory: Callable[[Callable[[str, TrafficPolicy], None]], Controller],
        recorder: Recorder,
        admin_keys: list[str],
        faults: dict[tuple[str, str], FaultInjector] | None = None,
        tick_s: float = 1.0,
        on_close: Callable[[], None] | None = None,
        adapters: RuntimeAdapters | None = None,
        resolve: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.app = app
        self.adapters = adapters
        self.resolve = resolve  # (model, version) -> verified folder: versions added live
        self.versions = versions
        self.recorder = recorder
        self.metrics = RolloutMetrics()
        self.policies = {m: single(v) for m, v in serving.items()}
        self.controller = controller_factory(self.apply)
        self.admin_keys = admin_keys
        self.faults = faults or {}
        self.started = time.monotonic()
        self.base_url: str | None = None  # learned from the first request (the drift probe)
        self._on_close = on_close
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = threading.Event()
        self._drop_unloaded()
        self.controller.resume()
        for model in self.versions:  # a finished rollout left the split it ended with
            state = self.controller.status(model)
            if state is not None and state.status not in ACTIVE:
                with contextlib.suppress(KilnError):  # its versions may no longer be loaded
                    self.apply(model, policy_for(state))
        self._ticker = threading.Thread(
            target=self._tick_loop, args=(tick_s,), name="kiln-rollout", daemon=True
        )
        self._ticker.start()

    def _drop_unloaded(self) -> None:
        """Abort an active rollout whose candidate this process does not serve (a version
        added live, then the gateway restarted without it): the baseline takes it all."""
        for state in self.controller.store.active():
            model, cand = state.spec.model, state.spec.candidate
            if model in self.versions and cand not in self.versions[model]:
                reason = (
                    f"version {cand} is not loaded after a restart (add it to --versions, "
                    "or kiln rollout add-version)"
                )
                with contextlib.suppress(KilnError):
                    self.controller.abort(model, reason)

    # -- policy ----------------------------------------------------------------
    def apply(self, model: str, policy: TrafficPolicy) -> None:
        """Install a model's policy (one assignment: atomic for new requests)."""
        loaded = set(self.versions.get(model, []))
        missing = {*policy.weights, *([policy.shadow] if policy.shadow else [])} - loaded
        if missing:
            raise KilnError(
                f"{model}: version(s) {sorted(missing)} are not loaded (loaded: {sorted(loaded)})",
                hint="start the server with every version the rollout needs (--versions)",
            )
        self.policies[model] = policy
        self.metrics.policy(model, policy)

    def _tick_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                for d in self.controller.tick():
                    self.metrics.decision(d)
            except Exception:  # a failed check must not stop later ones
                log.exception("rollout check failed")

    def close(self) -> None:
        """Stop the controller's thread (and close what ``on_close`` closes)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._ticker.join(5)
        if self._on_close is not None:
            self._on_close()

    # -- ASGI ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, self._lifespan_send(send))
            finally:
                self.close()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.base_url is None and scope.get("server"):
            host, port = scope["server"][:2]
            self.base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        path, method = scope["path"], scope["method"]
        if path == "/admin/rollout" or path.startswith("/admin/rollout/"):
            from modelkiln.rollout.gateway_admin import handle_admin

            await handle_admin(self, scope, receive, send)
        elif method == "POST" and path in MODEL_ROUTES:
            await self._route(scope, receive, send)
        elif method == "GET" and path in ("/v1/models", "/metrics"):
            await self._decorate(scope, receive, send)
        elif path == "/ready" and ready_error(self.adapters):
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send(
                {"type": "http.response.body", "body": ready_body(ready_error(self.adapters))}
            )
        else:
            await self.app(scope, receive, send)

    async def _route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or model not in self.policies:
            await self.app(scope, replay(body, receive), send)
            return
        assert isinstance(payload, dict)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = headers.get("x-user-key") or (str(payload["user"]) if payload.get("user") else None)
        override = headers.get(OVERRIDE_HEADER.lower())
        policy = self.policies[model]
        try:
            if override in self.versions[model] and policy.allow_override:
                a = Assignment(override, None, "override")  # any loaded version, not only split
            else:
                a = assign(policy, key=key, override=override)
        except KilnError as exc:
            await json_response(
                send,
                400,
                {
                    "error": {
                        "message": str(exc),
                        "type": "invalid_request_error",
                        "code": "bad_model_version",
                    }
                },
            )
            return
        # Answers are compared for a shadow only: a canary's new version is *meant* to
        # answer differently, its analysis mirror measures errors and latency.
        keep = policy.shadow is not None and _deterministic(scope["path"], payload)
        t0 = time.perf_counter()
        served = self._serve_one(scope, receive, send, payload, model, a.version, keep, t0)
        if a.shadow is None:
            await served
            return
        # The twin runs at the same time on the other version, from the same start time, and
        # which of the two reaches the server first is a coin flip: neither role (served or
        # mirrored) gives one version a head start, so their latencies compare.
        twin = self._mirror(scope, payload, model, a.shadow, t0)
        first, second = (served, twin) if random.random() < 0.5 else (twin, served)
        tasks = [self._spawn(first), self._spawn(second)]
        mine, mirror = (tasks[0], tasks[1]) if first is served else (tasks[1], tasks[0])
        try:
            status, answer = await mine
        except asyncio.CancelledError:
            mine.cancel()
            raise
        if keep:
            self._spawn(self._compare(model, mirror, status, answer))

    def _lifespan_send(self, send: Any) -> Any:
        """``send`` of the lifespan: once the app has started, load the runtime adapters."""

        async def wrapped(msg: dict[str, Any]) -> None:
            await send(msg)
            if self.adapters is not None and is_startup_complete(msg):
                self._spawn(load_adapters(self, self.adapters))

        return wrapped

    def target(self, model: str, version: str) -> str:
        """The served name one version's requests go to (``<base>:v<N>`` for an adapter)."""
        adapter = self.adapters.target(model, version) if self.adapters else None
        return adapter or served_name(model, version)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # a reference, or the loop may collect it mid-flight
        task.add_done_callback(self._tasks.discard)
        return task

    async def _serve_one(
        self, scope: dict[str, Any], receive: Any, send: Any, payload: dict[str, Any],
        model: str, version: str, keep: bool, t0: float | None = None,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Run one request on ``version``; record it; return its status (and body if kept).
        Its latency counts from ``t0`` (default: now)."""
        fault = self._fault(model, version)
        t0 = time.perf_counter() if t0 is None else t0
        if fault is not None and fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault is not None and fault.fail:
            await json_response(
                send,
                500,
                {
                    "error": {
                        "message": "injected fault",
                        "type": "server_error",
                        "code": "injected_fault",
                    }
                },
            )
            self._record(model, version, 500, t0, None, 0, t0)
            return 500, b""
        body = json.dumps({**payload, "model": self.target(model, version)}).encode()
        state: dict[str, Any] = {"status": 500, "first": None, "chunks": 0, "body": []}

        async def send2(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                msg = {
                    **msg,
                    "headers": [*msg.get("headers", []), (b"x-model-version", version.encode())],
                }
            elif msg["type"] == "http.response.body" and msg.get("body"):
                state["first"] = state["first"] or time.perf_counter()
                state["chunks"] += 1
                if keep:
                    state["body"].append(msg["body"])
            await send(msg)

        try:
            await self.app(_with_length(scope, len(body)), replay(body, receive), send2)
        finally:
            self._record(
                model,
                version,
                state["status"],
                t0,
                state["first"],
                state["chunks"],
                time.perf_counter(),
                bool(payload.get("stream")),
            )
        return state["status"], b"".join(state["body"])

    def _fault(self, model: str, version: str) -> Any:
        inj = self.faults.get((model, version))
        return inj.draw(time.monotonic() - self.started) if inj is not None else None

    def _record(
        self, model: str, version: str, status: int, t0: float, first: float | None,
        chunks: int, end: float, stream: bool = False,
    ) -> None:  # fmt: skip
        ok = status < 500 or status == 499  # a client that went away is not the model's fault
        ms = (end - t0) * 1000
        self.metrics.request(model, version, status, ms / 1000)
        if status == 429:  # refused by admission control: its time is a hold, not service
            self.recorder.record(model, version, ok=True)
            return
        ttft = (first - t0) * 1000 if stream and first is not None else None
        tpot = (end - first) * 1000 / (chunks - 1) if stream and first and chunks > 1 else None
        self.recorder.record(model, version, ok=ok, latency_ms=ms, ttft_ms=ttft, tpot_ms=tpot)

    async def _mirror(
        self, scope: dict[str, Any], payload: dict[str, Any], model: str, version: str,
        t0: float | None = None,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Run the request's twin on ``version`` (same body, streamed or not); discard it."""
        chunks: list[bytes] = []
        status = [500]

        async def sink(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        async def no_more() -> dict[str, Any]:
            await asyncio.Event().wait()  # never disconnects; the app stops reading at the end
            return {"type": "http.disconnect"}

        shadow_scope = {**scope, "method": "POST"}
        await self._serve_one(shadow_scope, no_more, sink, payload, model, version, False, t0)
        return status[0], b"".join(chunks)

    async def _compare(
        self, model: str, mirror: asyncio.Task[tuple[int, bytes]], served_status: int,
        served_body: bytes,
    ) -> None:  # fmt: skip
        """Record the agreement of a served answer with its twin's."""
        status, body = await mirror
        if served_status == 200 and status == 200 and served_body:
            try:
                score = response_agreement(json.loads(served_body), json.loads(body))
            except ValueError:
                score = None
            if score is not None:
                self.recorder.record_pair(model, score)

    async def _decorate(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass GET /v1/models or /metrics through, adding the rollout's part."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def grab(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                start.update(msg)
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, grab)
        body = b"".join(chunks)
        if start.get("status") == 200:
            if scope["path"] == "/metrics":
                body += self.metrics.render()
            else:
                from modelkiln.rollout.gateway_admin import models_json

                body = models_json(self, body)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send(
            {
                "type": "http.response.start",
                "status": start.get("status", 500),
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _deterministic(path: str, payload: dict[str, Any]) -> bool:
    """Whether two runs of the request should give the same answer (embeddings, or greedy
    and unstreamed): only those pairs measure agreement; sampled answers differ anyway."""
    if path in ("/v1/embeddings", "/inference"):
        return True
    return payload.get("temperature") == 0 and not payload.get("stream")


def _with_length(scope: dict[str, Any], n: int) -> dict[str, Any]:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(n).encode())]}
