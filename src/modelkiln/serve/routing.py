"""Helpers every model route shares: the app's state, admission and the response cache.

Example:
    >>> state = state_of(request)
    >>> guard(request, state, served, tokens)
    >>> with admit(state, served, tokens):
    ...     ...
"""

from __future__ import annotations

from fastapi import Request

from modelkiln.serve.admission import Overloaded, Ticket
from modelkiln.serve.hooks import add_headers
from modelkiln.serve.http_errors import overloaded
from modelkiln.serve.state import ServedModel, ServerState

#: Media type of every JSON body the model routes write themselves.
JSON = "application/json"


def state_of(request: Request) -> ServerState:
    """The app's :class:`ServerState`."""
    state: ServerState = request.app.state.kiln
    return state


def guard(request: Request, state: ServerState, served: ServedModel, tokens: int) -> None:
    """Ask the plugged request guards (scopes, allowlists, per-key limits) before anything runs.

    Called before the cache is read, so a refused caller gets no cached answer either.

    Raises:
        RequestRejected: a guard refused the request (403, 429 ...).
    """
    if not state.hooks.guards:
        return
    principal = request.scope.get("state", {}).get("principal")
    route = request.scope["path"]
    for g in state.hooks.guards:
        headers = g.admit(principal, served.name, route, tokens)
        if headers:
            add_headers(request, dict(headers))


def admit(state: ServerState, served: ServedModel, tokens: int) -> Ticket:
    """A place in the model's queue, or 429."""
    try:
        return served.admission.admit(tokens)
    except Overloaded as exc:
        raise overloaded(exc.reason, exc.message, exc.retry_after) from None


async def cached(state: ServerState, served: ServedModel, key: str | None) -> bytes | None:
    """The cached body for ``key`` (counting hits and misses)."""
    if key is None or not state.cfg.cache.enabled:
        return None
    hit = await state.cache.get(key)
    (state.metrics.cache_hits if hit is not None else state.metrics.cache_misses).labels(
        served.name
    ).inc()
    return hit
