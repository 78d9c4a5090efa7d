"""The modelkiln server as a Ray Serve deployment (imported by Ray, never by ``kiln --help``).

Each model replica builds the very app ``kiln serve`` runs (:func:`modelkiln.serve.create_app`,
the serve package's public entry), so the OpenAI routes, probes, limits and ``/metrics``
are the same code; the app is built inside the replica, its engines and threads are never
pickled. Serve's HTTP proxy hands requests to the ingress deployment
(:mod:`modelkiln.deploy.ray_ingress`), which streams each one through a replica's
:meth:`KilnServer.forward` and retries it elsewhere (or answers 503) if that replica dies.

Two additions, as an ASGI middleware around the app:

* the replica only reports itself started when its model is loaded and warm, so Serve
  routes no request to a replica still loading (a failed load fails the replica);
* every response carries ``x-kiln-replica: <Serve replica id>``: ``/metrics`` is that
  replica's own registry, and the header says which one answered.

Example (what ``serve run serve_config.yaml`` does with the written config):
    >>> serve.run(build_app({"model": {"path": "runs/x/model"}, "serve": {}, "deployment": {}}))
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, cast

from ray import serve

from modelkiln.deploy.ray_config import DEPLOYMENT_NAME
from modelkiln.deploy.ray_ingress import KilnIngress, acknowledge_lifespan

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
#: Response header naming the replica that answered.
REPLICA_HEADER = "x-kiln-replica"
#: Longest a replica waits for its model before it reports a failed start.
LOAD_TIMEOUT_S = 600.0


def replica_id() -> str:
    """Serve's id of this replica (the process id outside a replica)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # boundary: not inside a Serve replica (or an older Ray)
        return f"pid-{os.getpid()}"


class ReplicaMiddleware:
    """Holds the lifespan's startup.complete until the models are warm; tags responses."""

    def __init__(self, app: Any, *, state: Any, replica: str) -> None:
        self.app = app
        self.state = state
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Message, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)

    def _lifespan_send(self, send: Send) -> Send:
        async def wait_warm(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                deadline = time.monotonic() + LOAD_TIMEOUT_S
                while not self.state.ready and self.state.load_error is None:
                    if time.monotonic() > deadline:
                        self.state.load_error = TimeoutError(f"not warm in {LOAD_TIMEOUT_S} s")
                        break
                    await asyncio.sleep(0.05)
                if self.state.load_error is not None:
                    message = {
                        "type": "lifespan.startup.failed",
                        "message": repr(self.state.load_error),
                    }
            await send(message)

        return wait_warm


class _Started:
    """The app, already started by the replica: Serve's lifespan is only acknowledged."""

    def __init__(self, app: Any, lifespan: Any) -> None:
        self.app, self.lifespan = app, lifespan

    async def __call__(self, scope: Message, receive: Any, send: Send) -> None:
        if scope["type"] == "lifespan":
            await acknowledge_lifespan(receive, send)
            return
        await self.app({**scope, "state": dict(self.lifespan.state)}, receive, send)


class KilnReplica:
    """One model replica: the modelkiln server app, called by the ingress through a handle
    (:data:`KilnServer`) or, with ``ingress: false``, by Serve's proxy
    (:data:`KilnServerDirect`)."""

    # Ray actors may have an async __init__ (Serve awaits it); type checkers expect None.
    async def __init__(self, model: dict[str, Any], serve_fields: dict[str, Any]) -> None:  # type: ignore[misc]
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from modelkiln.serve import ServeConfig, create_app

        cfg = ServeConfig.model_validate({**serve_fields, "models": [model]})
        app = create_app(cfg)
        self._state = app.state.kiln
        self._app = ReplicaMiddleware(app, state=self._state, replica=replica_id())
        # uvicorn's lifespan runner, as Serve's own ingress wrapper uses: the app starts
        # (and its model warms) before this replica is reported running.
        self._lifespan = LifespanOn(Config(self._app, lifespan="on", log_level="warning"))
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError(f"model failed to start: {self._state.load_error!r}")

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """Run one HTTP request through the server app; yield its ASGI response messages."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # a client that leaves cancels this generator
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self._app({**scope, "state": dict(self._lifespan.state)}, receive, queue.put)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (message := await queue.get()) is not None:
                yield message
            await task  # an exception of the app surfaces here
        finally:
            task.cancel()

    def __serve_build_asgi_app__(self) -> Any:
        """What Serve's proxy calls when there is no ingress deployment (``ingress: false``)."""
        return _Started(self._app, self._lifespan)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model failed is replaced."""
        if self._state is not None and self._state.load_error is not None:
            raise RuntimeError(f"model failed: {self._state.load_error}")

    async def __del__(self) -> None:
        """Serve awaits this on shutdown: run the app's lifespan shutdown (engines stop)."""
        await self._lifespan.shutdown()


#: The model deployment behind modelkiln's ingress (an application has one Serve ingress).
KilnServer = serve.deployment(name=DEPLOYMENT_NAME)(KilnReplica)
#: The model deployment as the application's ingress itself (``ingress: false``).
KilnServerDirect = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(KilnReplica))


def build_app(args: dict[str, Any]) -> Any:
    """The application builder ``serve run`` calls with the config's ``args``: the
    ingress (retries, 503) in front of the model deployment, unless ``ingress`` is false."""
    opts = dict(args.get("deployment") or {})
    opts.pop("name", None)
    bound = (args["model"], args.get("serve") or {})
    if not args.get("ingress", True):
        return cast(Any, KilnServerDirect).options(**opts).bind(*bound)
    server = cast(Any, KilnServer).options(**opts).bind(*bound)
    return cast(Any, KilnIngress).bind(server, int(args.get("retries", 1)))
