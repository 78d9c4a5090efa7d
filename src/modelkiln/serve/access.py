"""Who may call the server: the authentication middleware and the default API-key check.

Every request but ``/health`` and ``/ready`` goes through one
:class:`~modelkiln.contract.serving.Authenticator`; the principal it returns is
kept in ``request.state.principal``. Without a plugged authenticator the
server checks its API keys (config ``api_keys`` and ``$MODELKILN_API_KEYS``;
``Authorization: Bearer <key>``; only SHA-256 digests kept, compared in
constant time; no keys configured = auth off), and the ``/admin`` routes check
the admin keys instead (see :func:`require_admin`).

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
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from modelkiln.contract.serving import Authenticator, RequestRejected, error_body

#: Routes that answer without credentials (liveness / readiness probes).
OPEN_PATHS = frozenset({"/health", "/ready"})
#: Routes the default check leaves to the admin router (checked against the admin keys).
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


@dataclass(frozen=True)
class KeyPrincipal:
    """A caller holding one of the configured API keys (no per-key identity: keys are shared)."""

    subject: str = "api-key"


class APIKeyAuthenticator:
    """The default :class:`Authenticator`: one of the configured API keys, or 401."""

    def __init__(self, keys: APIKeys) -> None:
        self.keys = keys

    def authenticate(self, request: Request) -> KeyPrincipal:
        """The principal of a request carrying an accepted key.

        Raises:
            RequestRejected: 401 without an accepted key.
        """
        header = request.headers.get("authorization")
        if self.keys.check(header):
            return KeyPrincipal()
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if header is None
            else "invalid API key"
        )
        raise RequestRejected(
            401,
            message,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
            reason="unauthorized",
        )


class AuthMiddleware:
    """ASGI middleware: authenticate every request but the probes; refuse in the OpenAI shape.

    Args:
        app: the wrapped application.
        authenticator: who decides.
        skip_admin: leave ``/admin/`` to the admin router (the default API-key check).
        on_reject: called with the refusal's reason once per refused request (metrics).
    """

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        *,
        skip_admin: bool = False,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.skip_admin = skip_admin
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in OPEN_PATHS
            or (self.skip_admin and path.startswith(ADMIN_PREFIX))
        ):
            await self.app(scope, receive, send)
            return
        try:
            principal = self.authenticator.authenticate(Request(scope))
        except RequestRejected as exc:
            if self.on_reject is not None:
                self.on_reject(exc.reason)
            await _refuse(send, exc)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(send: Send, exc: RequestRejected) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def require_admin(request: Request, admin_keys: APIKeys, plugged: bool) -> None:
    """Check that the caller may use the ``/admin`` routes.

    With a plugged authenticator (``plugged``), the principal it returned must hold
    the ``admin`` scope; otherwise the request must carry an admin key.

    Raises:
        RequestRejected: 403 (admin API disabled, or no admin scope), 401 (no admin key).
    """
    if plugged:
        principal: Any = getattr(request.state, "principal", None)
        if "admin" not in getattr(principal, "scopes", ()):
            raise RequestRejected(
                403, "this credential lacks the 'admin' scope", code="permission_denied"
            )
        return
    if not admin_keys.enabled:
        raise RequestRejected(
            403, "the admin API is disabled: no admin key is configured", code="admin_disabled"
        )
    if not admin_keys.check(request.headers.get("authorization")):
        raise RequestRejected(
            401,
            "missing or invalid admin key: send 'Authorization: Bearer <admin key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


__all__ = [
    "ADMIN_PREFIX",
    "OPEN_PATHS",
    "APIKeyAuthenticator",
    "APIKeys",
    "AuthMiddleware",
    "KeyPrincipal",
    "error_body",
    "require_admin",
]
