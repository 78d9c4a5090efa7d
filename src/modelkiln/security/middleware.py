"""The server's security layer: authenticate, authorise (scope + model), rate-limit, audit.

One ASGI middleware in front of every route but the probes:

1. ``Authorization: Bearer <token>``: a ``mk_...`` key goes to the key store, a
   token with two dots to the JWT authenticator. No / bad / expired / revoked
   credentials -> 401; a valid one without the route's scope or the requested
   model on its allowlist -> 403.
2. Per-principal token buckets: over rpm or tpm -> 429 with ``Retry-After``;
   every answer carries ``x-ratelimit-*`` headers. Prompt + completion tokens
   are read from the response's ``usage`` (or counted per streamed chunk) and
   debited after the answer.
3. Every request (by config) goes to the audit log: principal, route, model,
   status, tokens — never the prompt.

The principal is left in ``scope["state"]["principal"]`` for routes that check
more (the admin routes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelkiln.errors import SecurityError
from modelkiln.security.audit import AuditLog
from modelkiln.security.keys import Principal
from modelkiln.security.ratelimit import Decision, Limiter, MemoryLimiter

log = logging.getLogger(__name__)

#: Routes that answer without credentials (liveness / readiness probes).
OPEN_PATHS = frozenset({"/health", "/ready"})
#: Scope each route needs; routes not listed need any valid credential.
ROUTE_SCOPES: dict[str, str] = {
    "/v1/completions": "infer",
    "/v1/chat/completions": "infer",
    "/inference": "infer",
    "/v1/embeddings": "embed",
}
_MAX_SCAN_BYTES = 1 << 20  # response bodies larger than this are not parsed for usage


class Authenticator(Protocol):
    """Turns a bearer token into a principal or raises :class:`SecurityError`."""

    def authenticate(self, token: str) -> Principal:
        """The principal of ``token``."""
        ...


@dataclass
class SecurityPolicy:
    """What the middleware enforces."""

    keys: Authenticator | None = None
    jwt: Authenticator | None = None
    limiter: Limiter = field(default_factory=MemoryLimiter)
    audit: AuditLog | None = None
    audit_requests: bool = True
    max_body_bytes: int = 4_000_000
    on_reject: Callable[[str], None] | None = None

    @property
    def enabled(self) -> bool:
        """True when any credential is checked."""
        return self.keys is not None or self.jwt is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value (401 material on failure)."""
        if not authorization:
            raise SecurityError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise SecurityError("the Authorization header must be 'Bearer <key>'")
        if token.count(".") == 2 and self.jwt is not None:
            return self.jwt.authenticate(token)
        if self.keys is not None:
            return self.keys.authenticate(token)
        raise SecurityError("invalid API key")


def required_scope(path: str) -> str | None:
    """The scope a route needs (``admin`` for ``/admin/...``)."""
    if path.startswith("/admin/"):
        return "admin"
    return ROUTE_SCOPES.get(path)


class SecurityMiddleware:
    """ASGI middleware applying a :class:`SecurityPolicy` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy
        self._fallback: MemoryLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.policy.enabled or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        header = _header(scope, b"authorization")
        try:
            principal = self.policy.authenticate(header)
        except SecurityError as exc:
            await self._refuse(send, scope, 401, exc.message, "invalid_api_key", None, started)
            return
        scope.setdefault("state", {})["principal"] = principal
        needed = required_scope(path)
        if needed is not None and needed not in principal.scopes:
            msg = f"{principal.subject} lacks the '{needed}' scope needed by {path}"
            await self._refuse(send, scope, 403, msg, "insufficient_scope", principal, started)
            return
        body, receive = await _buffer_body(scope, receive, self.policy.max_body_bytes)
        model = _model_of(body)
        if not principal.allows_model(model):
            msg = f"{principal.subject} may not use model {model!r}"
            await self._refuse(
                send, scope, 403, msg, "model_not_allowed", principal, started, model
            )
            return
        decision = self._acquire(principal)
        if not decision.allowed:
            msg = f"rate limit reached for {principal.subject}: retry after the Retry-After delay"
            await self._refuse(
                send,
                scope,
                429,
                msg,
                "rate_limit_exceeded",
                principal,
                started,
                model,
                decision.headers(),
            )
            return
        await self._forward(scope, receive, send, principal, decision, model, started)

    def _acquire(self, principal: Principal) -> Decision:
        if not principal.rpm and not principal.tpm:
            return Decision(allowed=True)
        try:
            return self.policy.limiter.acquire(principal.key_id, principal.rpm, principal.tpm)
        except Exception as exc:  # a Redis outage must not take the server down
            if self._fallback is None:
                log.warning("rate limiter unavailable, limiting in-process: %s", exc)
                self._fallback = MemoryLimiter()
            return self._fallback.acquire(principal.key_id, principal.rpm, principal.tpm)

    def _debit(self, principal: Principal, tokens: int) -> None:
        if not principal.tpm or tokens <= 0:
            return
        try:
            self.policy.limiter.debit(principal.key_id, principal.tpm, tokens)
        except Exception:  # same outage as above; counted in-process meanwhile
            if self._fallback is not None:
                self._fallback.debit(principal.key_id, principal.tpm, tokens)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        decision: Decision,
        model: str | None,
        started: float,
    ) -> None:
        extra = [(k.encode(), v.encode()) for k, v in decision.headers().items()]
        meter = _UsageMeter()
        status = 500

        async def wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                meter.feed(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            tokens = meter.tokens()
            self._debit(principal, tokens)
            self._audit(scope, principal, status, started, model, tokens)

    async def _refuse(
        self,
        send: Send,
        scope: Scope,
        status: int,
        message: str,
        code: str,
        principal: Principal | None,
        started: float,
        model: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        from modelkiln.serve.http_errors import error_body  # the one OpenAI error shape

        if self.policy.on_reject is not None:
            self.policy.on_reject({401: "unauthorized", 403: "forbidden"}.get(status, code))
        kind = {401: "authentication_error", 403: "permission_error"}.get(
            status, "rate_limit_error"
        )
        body = json.dumps(error_body(message, kind, None, code)).encode()
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            hdrs.append((b"www-authenticate", b"Bearer"))
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})
        self._audit(scope, principal, status, started, model, 0, reason=code)

    def _audit(
        self,
        scope: Scope,
        principal: Principal | None,
        status: int,
        started: float,
        model: str | None,
        tokens: int,
        reason: str | None = None,
    ) -> None:
        audit = self.policy.audit
        if audit is None or not (self.policy.audit_requests or status in (401, 403)):
            return
        client = scope.get("client") or ("", 0)
        fields: dict[str, Any] = {
            "principal": principal.subject if principal else None,
            "method": scope.get("method"),
            "route": scope.get("path"),
            "model": model,
            "status": status,
            "tokens": tokens,
            "client": client[0],
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if reason:
            fields["reason"] = reason
        audit.write("request", **fields)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _buffer_body(scope: Scope, receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """Read the request body (up to ``limit`` + 1 bytes) and a ``receive`` that replays it."""
    if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return b"", receive
    chunks: list[Message] = []
    size, more = 0, True
    while more and size <= limit:
        message = await receive()
        chunks.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.request")
    pending = list(chunks)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return body, replay


def _model_of(body: bytes) -> str | None:
    if not body or body[:1] != b"{":
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


class _UsageMeter:
    """Finds the tokens a response used: ``usage.total_tokens``, or streamed chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._chunks = 0
        self._usage: int | None = None

    def feed(self, body: bytes) -> None:
        if body.startswith(b"data: ") or self._chunks:
            self._chunks += body.count(b'"choices":[{')
            if b'"usage":{' in body:
                self._usage = _usage_in_sse(body) or self._usage
        elif len(self._buf) + len(body) <= _MAX_SCAN_BYTES:
            self._buf += body

    def tokens(self) -> int:
        if self._usage is not None:
            return self._usage
        if self._buf:
            try:
                usage = json.loads(self._buf).get("usage") or {}
                return int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
            except (ValueError, AttributeError, TypeError):
                return 0
        return self._chunks


def _usage_in_sse(body: bytes) -> int | None:
    for line in body.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            try:
                usage = json.loads(line[6:]).get("usage") or {}
                return int(usage.get("total_tokens") or 0) or None
            except (ValueError, TypeError):
                continue
    return None


def as_sequence(value: Sequence[str] | str | None) -> list[str]:
    """Split ``a,b`` option values into a list."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [v.strip() for v in items if v.strip()]
