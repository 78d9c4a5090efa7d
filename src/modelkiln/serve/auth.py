"""API-key authentication: ``Authorization: Bearer <key>`` on every route but health checks.

Keys come from the config and ``$MODELKILN_API_KEYS``; only their SHA-256
digests are kept in memory, compared in constant time. With no keys
configured, auth is off.

Example:
    >>> keys = APIKeys(["s3cret"])
    >>> keys.check("Bearer s3cret"), keys.check("Bearer nope"), keys.check(None)
    (True, False, False)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from modelkiln.serve.http_errors import error_body

#: Routes that answer without a key (liveness / readiness probes).
OPEN_PATHS = frozenset({"/health", "/ready"})
#: Routes checked against the admin keys (by the admin router) instead of the API keys.
ADMIN_PREFIX = "/admin/"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class APIKeys:
    """The accepted keys, stored hashed."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries an accepted key."""
        if not self._digests:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        candidate = _digest(token.strip())
        # No early exit: every digest is compared, so timing says nothing about which matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


class AuthMiddleware:
    """ASGI middleware answering 401 (OpenAI error shape) without an accepted key.

    Args:
        app: the wrapped application.
        keys: accepted keys.
        on_reject: called once per refused request (metrics).
    """

    def __init__(
        self, app: ASGIApp, keys: APIKeys, on_reject: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not self.keys.enabled
            or path in OPEN_PATHS
            or path.startswith(ADMIN_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if self.keys.check(header):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject()
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if header is None
            else "invalid API key"
        )
        body = json.dumps(error_body(message, "authentication_error", None, "invalid_api_key"))
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
