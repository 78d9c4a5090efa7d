"""Refuse at the door: a 429 from the headers alone when every model of a route is over.

Under a flood most requests are refused; when each refusal first costs JSON
parsing, validation and tokenization, the refusals starve the model (the
issue measured 58 % goodput at 8x capacity). :class:`AdmissionDoor` is the
application's **outermost** ASGI layer (outside Starlette's error and request
middleware, routing and ``Request`` objects): if every model the route could
reach is already over its queue bounds (:meth:`AdmissionController.over`), it
drains the body's raw bytes unparsed (so the connection stays usable for the
client's next request) and answers 429 with the computed ``Retry-After`` from
prebuilt bytes. It keeps what the inner layers would have done for that answer:
the request and rejection counters, a :class:`RequestRecord` for the observers,
and the authenticator's verdict (a caller the authenticator refuses goes on
and gets its 401; the door only refuses callers it would let in).

The answer is held ``min(reject_hold_s, max_queue_wait_s)`` and its
``Retry-After`` shortened by as much (a route's own 429, when its queue filled
after this check, is held too, see :func:`held_429s`): clients that resend at
once (no backoff) then send at most one request per hold, so refusals cannot
cost more CPU than the work they protect (512 such clients answered at once
made ~500 refusals a second on 2 cores and starved the model). The holds wait
on a coarse timer grid (:class:`HoldGrid`): every refusal due in the same
``HOLD_GRID_S`` slot wakes with one timer, so a flood's holds cost the event
loop one wake-up per slot, not one per refusal.

When a route can still reach a model with room, the request goes on and the
route's own admission (after tokenization, knowing the request's size) decides.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelkiln.contract.serving import RequestRecord, RequestRejected
from modelkiln.serve.admission import Overloaded
from modelkiln.serve.http_errors import error_body
from modelkiln.serve.state import ServedModel, ServerState

#: Model routes and the kind of model they reach.
ROUTE_KINDS = {
    "/v1/embeddings": "encoder",
    "/v1/completions": "causal_lm",
    "/v1/chat/completions": "causal_lm",
    "/inference": "causal_lm",
}

#: Width of the hold timer's slots, seconds: a held 429 is sent at the end of the slot its
#: hold ends in (at most this much later than the hold).
HOLD_GRID_S = 0.25


class HoldGrid:
    """Sleeps that end on a grid of ``step`` seconds: one timer per slot, not per sleeper.

    Each sleeper waits on its own future (a cancelled sleeper cancels only itself); the
    slot's single timer resolves them all in one pass of the event loop.
    """

    def __init__(self, step: float = HOLD_GRID_S) -> None:
        self.step = step
        self._slots: dict[int, list[asyncio.Future[None]]] = {}

    async def sleep(self, seconds: float) -> None:
        """Wait at least ``seconds``, until the end of the grid slot that time falls in."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + seconds) / self.step)
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            loop.call_at(slot * self.step, self._wake, slot)
        future: asyncio.Future[None] = loop.create_future()
        waiters.append(future)
        await future

    def pending(self) -> int:
        """Sleepers not woken yet (for tests and metrics)."""
        return sum(len(w) for w in self._slots.values())

    def _wake(self, slot: int) -> None:
        for future in self._slots.pop(slot, ()):
            if not future.done():
                future.set_result(None)


class AdmissionDoor:
    """The outermost ASGI layer: 429 before any parsing when every model of the route is over.

    Args:
        app: the whole application (Starlette's middleware stack).
        state: the server state (models and their admission, metrics, observers, config).
        authenticator: the server's authenticator, or None when auth is off. Only a caller
            it accepts is refused here; others go on to the auth layer's 401.
        grid: the hold timer (one per app).
    """

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        authenticator: Callable[[Request], object] | None = None,
        grid: HoldGrid | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.authenticate = authenticator
        self.grid = grid or HoldGrid()
        self._answers: dict[tuple[str, int, bool], tuple[Message, Message]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        kind = ROUTE_KINDS.get(scope["path"])
        found = refusal(self.state, kind) if kind is not None else None
        if found is None:
            if kind is not None and self.state.cfg.queue_hold_s:
                send = held_429s(send, self.state, kind, self.grid)
            await self.app(scope, receive, send)
            return
        principal = None
        if self.authenticate is not None:
            try:
                principal = self.authenticate(Request(scope))
            except RequestRejected:  # the auth layer answers (401), not the door
                await self.app(scope, receive, send)
                return
        started = time.perf_counter()
        served, refused = found
        state = self.state
        state.metrics.rejections.labels(refused.reason).inc()
        keep = await _drain(receive, state.cfg.max_body_bytes)
        # Hold the answer (no CPU: a timer slot): clients that resend at once on a 429 would
        # otherwise turn refusals into a flood that starves the model (see reject_hold_s).
        held = state.cfg.queue_hold_s
        await self.grid.sleep(held)
        start, body = self._answer(refused.reason, max(1, refused.retry_after - int(held)), keep)
        await send(start)
        await send(body)
        state.metrics.requests.labels(served.name, served.version, "429").inc()
        if state.observers.active:
            state.observers.emit(
                RequestRecord(
                    route=scope["path"],
                    method="POST",
                    status=429,
                    latency_s=time.perf_counter() - started,
                    time=time.time(),
                    model=served.name,
                    version=served.version,
                    principal=getattr(principal, "subject", None),
                )
            )

    def _answer(self, reason: str, retry_after: int, keep_alive: bool) -> tuple[Message, Message]:
        """The 429's two ASGI messages, built once per (reason, Retry-After, keep-alive)."""
        key = (reason, retry_after, keep_alive)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = _messages(reason, retry_after, keep_alive)
        return answer


def refusal(state: ServerState, kind: str | None) -> tuple[ServedModel, Overloaded] | None:
    """The model of ``kind`` that frees up first and its refusal, or None if one has room."""
    found: tuple[ServedModel, Overloaded] | None = None
    any_model = False
    for served in state.models.values():
        if served.kind != kind:
            continue
        any_model = True
        refused = served.admission.over()
        if refused is None:
            return None
        if found is None or refused.retry_after < found[1].retry_after:
            found = (served, refused)
    return found if any_model else None  # none loaded / unknown: the route answers (503, 404)


def held_429s(send: Send, state: ServerState, kind: str, grid: HoldGrid) -> Send:
    """``send``, holding the route's own 429 when its queue filled after the early check.

    Only while the queue is over: other 429s (a plug-in's per-key limit) pass at once.
    """

    async def held(message: Message) -> None:
        start = message["type"] == "http.response.start"
        if start and message["status"] == 429 and refusal(state, kind):
            await grid.sleep(state.cfg.queue_hold_s)
        await send(message)

    return held


_REASONS = {
    "queue_wait": "its queue needs longer to drain than max_queue_wait_s allows",
    "queue_requests": "its queue holds max_queued_requests requests",
    "queue_tokens": "its queue holds max_queued_tokens tokens",
}


def _messages(reason: str, retry_after: int, keep_alive: bool) -> tuple[Message, Message]:
    why = _REASONS.get(reason, reason)
    message = f"the server is overloaded ({reason}): {why}; retry after {retry_after} s"
    body = json.dumps(error_body(message, "rate_limit_error", None, "queue_full")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    if not keep_alive:
        headers.append((b"connection", b"close"))
    return (
        {"type": "http.response.start", "status": 429, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and drop the body (unparsed); False if it passes ``limit`` (then close instead)."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        size += len(message.get("body", b""))
        if size > limit:
            return False
        if not message.get("more_body", False):
            return True
