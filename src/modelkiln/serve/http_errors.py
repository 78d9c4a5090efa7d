"""HTTP errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause maps to a 4xx, every capacity or lifecycle
condition to 429 / 503 / 504; a 500 means a bug in the server::

    400 invalid_request_error   bad JSON, bad field, unsupported option, input too long
    401 authentication_error    no or wrong API key
    404 not_found_error         unknown model or route
    413 invalid_request_error   body larger than max_body_bytes (code request_too_large)
    429 rate_limit_error        queue full by requests or tokens (with Retry-After)
    503 service_unavailable     not ready yet, or draining after SIGTERM
    504 timeout_error           the request passed its deadline
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelkiln.contract.serving import RequestRejected, error_body
from modelkiln.errors import KilnError, ServingError

__all__ = ["APIError", "ClientGone", "RequestRejected", "error_body", "install_error_handlers"]

log = logging.getLogger(__name__)


class APIError(RequestRejected):
    """A request failed with an HTTP status; rendered in the OpenAI error shape.

    The server's own refusals; plug-ins raise the core :class:`RequestRejected`
    (same arguments), which renders the same way.
    """

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return _response(self)


def _response(exc: RequestRejected) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class ClientGone(Exception):
    """The client disconnected before the answer was ready (logged as status 499)."""


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """400 for input the server cannot use."""
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: list[str]) -> APIError:
    """404 for a model name the server does not serve."""
    return APIError(
        404,
        f"the model {name!r} does not exist; served models: {', '.join(available) or 'none'}",
        code="model_not_found",
        param="model",
    )


def overloaded(reason: str, detail: str, retry_after: int) -> APIError:
    """429 with Retry-After when the admission queue is full (``reason``: which bound)."""
    return APIError(
        429,
        f"the server is overloaded: {detail}; retry after {retry_after} s",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
        reason=reason,
    )


def unavailable(message: str, code: str) -> APIError:
    """503 while loading or draining."""
    return APIError(503, message, code=code, headers={"Retry-After": "1"})


def deadline_exceeded(timeout_s: float) -> APIError:
    """504 when a request passed its deadline."""
    return APIError(
        504, f"the request did not finish within {timeout_s:g} s", code="deadline_exceeded"
    )


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def _count(request: Request, reason: str) -> None:
    hook = getattr(request.app.state, "on_rejection", None)
    if hook is not None:
        hook(reason)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestRejected)
    if exc.status < 500 or exc.status in (503, 504):
        _count(request, exc.reason)
    return _response(exc)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _validation_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('msg')}"
    elif param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object (send Content-Type: application/json)"
    elif param is None:
        message = f"invalid request body: {str(first.get('msg')).removeprefix('Value error, ')}"
    else:
        message = f"invalid value for '{param}': {first.get('msg')}"
        if "input" in first and first.get("type") != "missing":
            shown = json.dumps(first["input"], default=str)
            message += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    _count(request, "invalid")
    return APIError(400, message, param=param).response()


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail) if exc.detail else "error"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    headers = dict(exc.headers or {})
    _count(request, f"http_{exc.status_code}")
    return APIError(exc.status_code, message, headers=headers).response()


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this response; 499 (nginx's "client closed request") labels the metrics.
    return Response(status_code=499)


async def _on_kiln_error(request: Request, exc: Exception) -> JSONResponse:
    # A ServingError that is not an APIError comes from an engine refusing work
    # (stopped, draining): the client should retry elsewhere.
    assert isinstance(exc, KilnError)
    status = 503 if isinstance(exc, ServingError) else 400
    return APIError(status, str(exc), code="unavailable" if status == 503 else None).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, f"internal server error ({type(exc).__name__})").response()


def install_error_handlers(app: FastAPI) -> None:
    """Render every error of ``app`` in the OpenAI shape with the right status.

    Refusals are reported to ``app.state.on_rejection(reason)`` when the app sets it.
    """
    app.add_exception_handler(RequestRejected, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(KilnError, _on_kiln_error)
    app.add_exception_handler(Exception, _on_unexpected)
