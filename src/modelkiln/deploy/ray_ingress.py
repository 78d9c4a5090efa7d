"""Serve's HTTP ingress in front of the model replicas (imported by Ray, never by ``kiln --help``).

Without it, Serve's proxy calls the model replica directly and answers a request whose
replica dies mid-flight with a bare 500 (``get_http_response_status`` maps every
``RayActorError`` to 500, and Serve does not retry a request a replica already holds).
This ingress calls the replicas through a ``DeploymentHandle`` instead, streaming their
ASGI messages back, so it can tell a dead replica from a failed request:

* the replica died (``RayActorError`` / ``ActorUnavailableError``) before the response
  reached the client (its status line is held until the first body part, so a replica
  dying between the two still counts as "before"): the request (its body is held here) is
  sent again, to a live replica — model requests are stateless, so a retry is safe; the
  answer then carries ``x-kiln-retries``;
* still failing after ``retries``: 503 with ``Retry-After`` in the server's OpenAI error
  shape, never Ray's 500 and never a hang;
* the client already has part of the response (a stream cut mid-way): the connection is
  closed, as the status line is out.

Example (what :func:`modelkiln.deploy.ray_app.build_app` binds):
    >>> KilnIngress.bind(KilnServer.bind(model, serve_fields), retries=1)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from modelkiln.contract.serving import error_body

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: Name of the ingress deployment inside each application.
INGRESS_NAME = "ingress"
#: A replica that died or cannot be reached (``ActorDiedError`` is a ``RayActorError``).
REPLICA_GONE = (RayActorError, ActorUnavailableError)
#: The parts of an HTTP scope the replica's app needs (all picklable).
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
              "query_string", "root_path", "headers", "client", "server")  # fmt: skip
_log = logging.getLogger(__name__)
#: Response header on an answer that came after re-sending: how many times it was re-sent.
RETRIES_HEADER = b"x-kiln-retries"
#: Seconds a client is told to wait after a 503 (a replacement replica is starting).
RETRY_AFTER_S = 1


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client left first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def unavailable(send: Send, detail: str) -> None:
    """503 + ``Retry-After``: every replica tried for this request died under it."""
    message = f"the model replica serving this request stopped ({detail}); retry shortly"
    body = json.dumps(error_body(message, "server_error", None, "replica_unavailable")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", str(RETRY_AFTER_S).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def acknowledge_lifespan(receive: Receive, send: Send) -> None:
    """Answer a lifespan scope for an app with nothing (more) to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


class Forwarder:
    """ASGI app: each HTTP request -> ``handle.forward(scope, body)`` (streamed), with retries."""

    def __init__(self, handle: Any, retries: int) -> None:
        self.handle = handle.options(stream=True)
        self.retries = retries

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served; the server closes the socket
        body = await read_body(receive)
        if body is None:
            return
        meta = {key: scope[key] for key in SCOPE_KEYS if key in scope}
        detail = ""
        for attempt in range(self.retries + 1):
            started = False
            held: Message | None = None  # the status line, until its first body part is here
            try:
                async for message in self.handle.forward.remote(meta, body):
                    if message["type"] == "http.response.start":
                        if attempt:  # say it was re-sent (clients and tests can count them)
                            retried = (RETRIES_HEADER, str(attempt).encode())
                            message = {**message, "headers": [*message["headers"], retried]}
                        # Held back: a replica dying between its status line and its body
                        # (they come as two messages) leaves the client nothing, so the
                        # request can still be re-sent. A whole JSON answer is one body part.
                        held = message
                        continue
                    if held is not None:
                        started = True
                        await send(held)
                        held = None
                    await send(message)
                if held is not None:  # a response with no body part at all
                    await send(held)
                return
            except REPLICA_GONE as exc:
                if started:
                    raise  # the status line is out: only closing the connection is left
                detail = type(exc).__name__
                _log.warning("replica gone (%s) under %s %s: re-sending", detail,
                             meta.get("method"), meta.get("path"))  # fmt: skip
        await unavailable(send, detail)


@serve.deployment(
    name=INGRESS_NAME,
    # It only forwards bytes: no CPU reserved (as Serve's own proxy), and enough room for
    # every request the model replicas may hold or queue.
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=10_000,
)
@serve.ingress()
class KilnIngress:
    """Serve's ingress: forwards each request to a model replica, retries one that died."""

    def __init__(self, server: Any, retries: int = 1) -> None:
        self._forwarder = Forwarder(server, retries)

    def __serve_build_asgi_app__(self) -> Any:
        """The forwarding ASGI app (Serve calls it after ``__init__``)."""
        return self._forwarder
