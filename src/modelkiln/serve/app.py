"""The FastAPI application: OpenAI-compatible routes, probes, metrics, docs.

Layers (outermost first): the admission door (a raw ASGI 429 from the headers
when every model of the route is over its queue bounds, before Starlette's
middleware, routing or request objects: serve/early.py) -> request (metrics by
status, records for the observers, the guards' headers: one wrapper times each
request once) -> auth (401) -> body limit (413) -> FastAPI with OpenAI-shaped
error handlers -> routes. Models load in the background after
startup, so ``/health`` answers at once and ``/ready`` turns 200 when every
engine is warm.

Example:
    >>> app = create_app(ServeConfig(models=[ModelSpec(path=minilm_dir)]))
    >>> uvicorn.run(app, port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp

from modelkiln.contract.serving import Authenticator, ServeHooks
from modelkiln.serve import admin, completions, embedding_routes
from modelkiln.serve.access import APIKeyAuthenticator, AuthMiddleware
from modelkiln.serve.config import ServeConfig
from modelkiln.serve.early import AdmissionDoor
from modelkiln.serve.hooks import RequestMiddleware
from modelkiln.serve.http_errors import install_error_handlers
from modelkiln.serve.limits import BodyLimitMiddleware
from modelkiln.serve.metrics import CONTENT_TYPE
from modelkiln.serve.schemas import ModelCard, ModelList
from modelkiln.serve.state import ServerState

log = logging.getLogger(__name__)

_DESCRIPTION = """OpenAI-compatible serving of causal LMs and encoders
(continuous batching for generation, dynamic batching for embeddings),
with the handbook's `/inference`, probes and Prometheus metrics.
Errors use the OpenAI shape `{"error": {"message", "type", "param", "code"}}`."""


def create_app(
    cfg: ServeConfig,
    *,
    engines: dict[str, Any] | None = None,
    started: float | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    hooks: ServeHooks | None = None,
) -> FastAPI:
    """Build the app serving ``cfg.models`` (or the prebuilt ``engines`` by name).

    Args:
        cfg: the server config.
        engines: prebuilt engines (a generation engine or an :class:`EmbeddingEngine`)
            by served name; they are started, warmed and shut down by the app.
        started: ``time.monotonic()`` at process start, for the cold-start figure.
        on_fatal: called if loading fails (the server should exit).
        hooks: what plug-ins add: request observers, an authenticator, request guards,
            extra routers, Prometheus collectors, model checks
            (:class:`~modelkiln.contract.serving.ServeHooks`).
    """
    state = ServerState(cfg, engines, started=started, on_fatal=on_fatal, hooks=hooks)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(state.load(), name="kiln-load-models")
        try:
            yield
        finally:
            state.draining = True
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            # uvicorn already spent part of the drain budget waiting for connections.
            left = cfg.drain_timeout_s
            if state.drain_deadline is not None:
                left = max(0.0, state.drain_deadline - time.monotonic())
            await state.shutdown(left)

    app = _KilnApp(
        title="modelkiln model server",
        version="1.0.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.kiln = state
    app.state.on_rejection = lambda reason: state.metrics.rejections.labels(reason).inc()
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(embedding_routes.router)
    app.include_router(admin.router)
    for router in state.hooks.routers:
        app.include_router(router)
    _add_probes(app, state)
    _add_middleware(app, state)
    return app


class _KilnApp(FastAPI):
    """FastAPI with :class:`AdmissionDoor` outside its whole middleware stack.

    Starlette builds the stack (error handling, middleware, routing) on the first
    request; the door wraps what it built, so a refused request in a flood costs no
    Starlette layer, no ``Request`` object and no routing.
    """

    def build_middleware_stack(self) -> ASGIApp:
        state: ServerState = self.state.kiln
        plugged = state.hooks.authenticator
        authenticator: Authenticator | None = plugged
        if plugged is None and state.keys.enabled:
            authenticator = APIKeyAuthenticator(state.keys)
        check = authenticator.authenticate if authenticator is not None else None
        return AdmissionDoor(super().build_middleware_stack(), state, check)


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    """Request (metrics + hooks) -> auth -> body limit (the last added runs first)."""
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=state.cfg.max_body_bytes,
        on_reject=lambda: state.metrics.rejections.labels("too_large").inc(),
    )
    plugged = state.hooks.authenticator
    if plugged is not None or state.keys.enabled:
        authenticator: Authenticator = plugged or APIKeyAuthenticator(state.keys)
        app.add_middleware(
            AuthMiddleware,
            authenticator=authenticator,
            skip_admin=plugged is None,  # the admin router checks the admin keys itself
            on_reject=lambda reason: state.metrics.rejections.labels(reason).inc(),
        )
    app.add_middleware(RequestMiddleware, metrics=state.metrics, hub=state.observers)


def _add_probes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, Any]:
        """Liveness: the process answers (models may still be loading)."""
        return {"status": "healthy", "timestamp": time.time()}

    @app.get("/ready", tags=["probes"])
    async def ready() -> JSONResponse:
        """Readiness: 200 when every model is loaded and warm; 503 while loading or draining."""
        if state.draining:
            status = "draining"
        elif state.load_error is not None:
            status = f"failed: {state.load_error}"
        elif not state.ready:
            status = "loading"
        else:
            return JSONResponse({"status": "ready", "models": sorted(state.models)})
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models(request: Request) -> ModelList:
        """The served models (OpenAI shape)."""
        cards = [ModelCard(id=m.name, created=m.created) for m in state.models.values()]
        cards += [
            ModelCard(id=f"{m.name}:{a}", created=m.created, owned_by=f"{m.name} (LoRA adapter)")
            for m in state.models.values()
            for a in sorted(getattr(m.engine, "adapters", {}))
        ]
        return ModelList(data=cards)
