"""The modelkiln server as a Ray Serve deployment (imported by Ray, never by ``kiln --help``).

Each replica builds the very app ``kiln serve`` runs (:func:`modelkiln.serve.create_app`,
the serve package's public entry) behind Serve's FastAPI ingress, so the OpenAI routes,
probes, limits and ``/metrics`` are the same code. Ray builds the app inside the replica
(``__serve_build_asgi_app__``): the engines and their threads are never pickled.

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
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

from ray import serve

from modelkiln.deploy.ray_config import DEPLOYMENT_NAME

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


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class KilnServer:
    """One replica: the modelkiln server app for one model."""

    def __init__(self, model: dict[str, Any], serve_fields: dict[str, Any]) -> None:
        self._model = model
        self._serve_fields = serve_fields
        self._state: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        """Build the server app in this replica (Serve calls it after ``__init__``)."""
        from modelkiln.serve import ServeConfig, create_app

        cfg = ServeConfig.model_validate({**self._serve_fields, "models": [self._model]})
        app = create_app(cfg)
        self._state = app.state.kiln
        app.add_middleware(ReplicaMiddleware, state=self._state, replica=replica_id())
        return app

    def check_health(self) -> None:
        """Serve's health check: a replica whose model failed is replaced."""
        if self._state is not None and self._state.load_error is not None:
            raise RuntimeError(f"model failed: {self._state.load_error}")


def build_app(args: dict[str, Any]) -> Any:
    """The application builder ``serve run`` calls with the config's ``args``."""
    opts = dict(args.get("deployment") or {})
    opts.pop("name", None)
    return cast(Any, KilnServer).options(**opts).bind(args["model"], args.get("serve") or {})
