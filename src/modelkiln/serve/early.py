"""Refuse at the door: a 429 from the headers alone when every model of a route is over.

Under a flood most requests are refused; when each refusal first costs JSON
parsing, validation and tokenization, the refusals starve the model (the
issue measured 58 % goodput at 8x capacity). :class:`EarlyAdmissionMiddleware`
runs before the body is parsed: if every model the route could reach is
already over its queue bounds (:meth:`AdmissionController.over`), it drains
the body's raw bytes unparsed (so the connection stays usable for the
client's next request) and answers 429 with the computed ``Retry-After``.

The answer is held ``min(reject_hold_s, max_queue_wait_s)`` (a timer, no CPU)
and its ``Retry-After`` shortened by as much (a route's own 429, when its queue
filled after this check, is held too): clients that resend at once (no
backoff) then send at most one request per hold, so refusals cannot cost more
CPU than the work they protect (512 such clients answered at once made ~500
refusals a second on 2 cores and starved the model).

When a route can still reach a model with room, the request goes on and the
route's own admission (after tokenization, knowing the request's size) decides.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class EarlyAdmissionMiddleware:
    """429 before parsing when every model of the route's kind is over its bounds."""

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = ROUTE_KINDS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        found = self._refusal(kind)
        if found is None:
            await self.app(scope, receive, self._held_429s(send, kind))
            return
        served, refusal = found
        scope.setdefault("state", {})["model"] = (served.name, served.version)  # for the metrics
        if self.on_reject is not None:
            self.on_reject(refusal.reason)
        keep = await _drain(receive, self.state.cfg.max_body_bytes)
        # Hold the answer (no CPU: a timer): clients that resend at once on a 429 would
        # otherwise turn refusals into a flood that starves the model (see reject_hold_s).
        held = self.state.cfg.queue_hold_s
        await asyncio.sleep(held)
        await _answer(send, refusal, keep, max(1, refusal.retry_after - int(held)))

    def _held_429s(self, send: Send, kind: str) -> Send:
        """``send``, holding the route's own 429 when its queue filled after the early check.

        Only while the queue is over: other 429s (a plug-in's per-key limit) pass at once.
        """
        hold_s = self.state.cfg.queue_hold_s

        async def held(message: Message) -> None:
            start = message["type"] == "http.response.start"
            if start and message["status"] == 429 and hold_s and self._refusal(kind):
                await asyncio.sleep(hold_s)
            await send(message)

        return held

    def _refusal(self, kind: str) -> tuple[ServedModel, Overloaded] | None:
        """The model of ``kind`` that frees up first and its refusal, or None if one has room."""
        models = [m for m in self.state.models.values() if m.kind == kind]
        if not models:
            return None  # not loaded yet / unknown: the route answers (503, 404)
        refusals = []
        for served in models:
            refusal = served.admission.over()
            if refusal is None:
                return None
            refusals.append((served, refusal))
        return min(refusals, key=lambda r: r[1].retry_after)


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


async def _answer(send: Send, refusal: Overloaded, keep_alive: bool, retry_after: int) -> None:
    """The 429; ``retry_after``: what is left of the refusal's Retry-After after the hold."""
    message = f"the server is overloaded: {refusal.message}; retry after {retry_after} s"
    body = json.dumps(error_body(message, "rate_limit_error", None, "queue_full")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    if not keep_alive:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
