"""The security plug-in of the model server (``modelkiln.contract.serving`` hooks).

- :class:`BearerAuthenticator`: ``Authorization: Bearer <token>`` -> a
  :class:`Principal`: an ``mk_...`` key goes to the key store, a token with two
  dots to the JWT checker. Missing / bad / expired / revoked -> 401.
- :class:`PolicyGuard`: per model request, the route's scope (403), the model
  allowlist (403) and the per-principal rpm / tpm buckets (429 with
  ``Retry-After``); every admitted answer carries ``x-ratelimit-*`` headers.
- :class:`UsageObserver`: debits each finished request's prompt + completion
  tokens from its principal's token bucket, and writes the audit record
  (principal, route, model, status, tokens — never the prompt).
- :func:`model_check`: the trust policy and the pickle guard, run on every model
  and runtime adapter directory before it loads.
- :func:`encrypted_model_loader` / :func:`encrypted_onnx_loader`: ``--decrypt-key-file``:
  AES-GCM torch weights or ONNX graphs decrypted in memory, never written in plaintext.

Example:
    >>> policy = SecurityPolicy(keys=KeyStore("keys.json"), audit=AuditLog("audit.jsonl"))
    >>> server = ModelServer(config=cfg, hooks=policy.hooks())
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from modelkiln.contract.audit import AuditLog
from modelkiln.contract.serving import RequestRecord, RequestRejected, ServeHooks
from modelkiln.errors import SecurityError
from modelkiln.security.keys import Principal
from modelkiln.security.ratelimit import Decision, Limiter, MemoryLimiter
from modelkiln.security.signing import TrustPolicy

log = logging.getLogger(__name__)

#: Scope each model route needs (other routes need any valid credential; /admin needs admin).
ROUTE_SCOPES: dict[str, str] = {
    "/v1/completions": "infer",
    "/v1/chat/completions": "infer",
    "/inference": "infer",
    "/v1/embeddings": "embed",
}


class TokenChecker(Protocol):
    """A key store or JWT checker: token -> principal, or :class:`SecurityError`."""

    def authenticate(self, token: str) -> Principal:
        """The principal of ``token``."""
        ...


@dataclass
class SecurityPolicy:
    """Everything the plug-in enforces; :meth:`hooks` turns it into server hooks."""

    keys: TokenChecker | None = None
    jwt: TokenChecker | None = None
    limiter: Limiter = field(default_factory=MemoryLimiter)
    audit: AuditLog | None = None
    audit_requests: bool = True
    audit_prompts: bool = False
    trust: TrustPolicy | None = None
    allow_pickle: bool = False
    uvicorn_options: dict[str, Any] = field(default_factory=dict)
    decrypt_key_file: Path | None = None

    def hooks(self) -> ServeHooks:
        """The server hooks enforcing this policy (the audit log also gets the key-store and
        JWKS reloads)."""
        guard = PolicyGuard(self.limiter)
        if self.audit is not None:
            for source in (self.keys, getattr(self.jwt, "jwks", None)):
                if source is not None and getattr(source, "audit", False) is None:
                    source.audit = self.audit  # type: ignore[union-attr]
        authenticator = (
            BearerAuthenticator(self.keys, self.jwt, self.audit) if self.keys or self.jwt else None
        )
        extra: dict[str, Any] = {}
        if self.decrypt_key_file is not None:
            key_file = self.decrypt_key_file
            extra["model_loader"] = lambda path: encrypted_model_loader(path, key_file)
            extra["onnx_loader"] = lambda path, threads: encrypted_onnx_loader(
                path, key_file, threads
            )
        return ServeHooks(
            **extra,
            authenticator=authenticator,
            guards=[guard] if authenticator else [],
            observers=[UsageObserver(guard, self.audit, self.audit_requests, self.audit_prompts)],
            model_checks=[
                lambda path: model_check(path, self.trust, self.allow_pickle, self.audit)
            ],
            uvicorn_options=dict(self.uvicorn_options),
        )


class BearerAuthenticator:
    """Authenticates every request with a store key or a JWT (401 otherwise)."""

    def __init__(
        self, keys: TokenChecker | None, jwt: TokenChecker | None, audit: AuditLog | None = None
    ) -> None:
        self.keys, self.jwt, self.audit = keys, jwt, audit

    def principal_of(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value.

        Raises:
            SecurityError: no, malformed, unknown, revoked or expired credentials.
        """
        if not authorization:
            raise SecurityError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise SecurityError("the Authorization header must be 'Bearer <key>'")
        if token.count(".") == 2 and self.jwt is not None:
            return self.jwt.authenticate(token)
        if self.keys is not None and token.startswith("mk_"):
            return self.keys.authenticate(token)
        raise SecurityError("invalid API key")

    def authenticate(self, request: Any) -> Principal:
        """The caller of ``request``; :class:`RequestRejected` 401 when unknown."""
        try:
            return self.principal_of(request.headers.get("authorization"))
        except SecurityError as exc:
            if self.audit is not None:
                client = request.client.host if request.client else ""
                self.audit.write(
                    "auth.failure", route=request.url.path, reason=exc.message, client=client
                )
            raise RequestRejected(
                401,
                exc.message,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
                reason="unauthorized",
            ) from None


class PolicyGuard:
    """Scope, model allowlist and per-principal rate limits of each model request."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self._fallback: MemoryLimiter | None = None
        self._tpm: dict[str, tuple[str, int]] = {}  # subject -> (bucket, tpm), for the debits
        self._lock = threading.Lock()

    def admit(self, principal: Any, model: str, route: str, tokens: int) -> Mapping[str, str]:
        """Refuse (403 / 429) or return the ``x-ratelimit-*`` headers."""
        if not isinstance(principal, Principal):
            return {}
        needed = ROUTE_SCOPES.get(route)
        if needed is not None and needed not in principal.scopes:
            raise RequestRejected(
                403,
                f"{principal.subject} lacks the '{needed}' scope needed by {route}",
                code="insufficient_scope",
                reason="forbidden",
            )
        if not principal.allows_model(model):
            raise RequestRejected(
                403,
                f"{principal.subject} may not use model {model!r}",
                code="model_not_allowed",
                param="model",
                reason="forbidden",
            )
        if not principal.rpm and not principal.tpm:
            return {}
        if principal.tpm:
            with self._lock:
                self._tpm[principal.subject] = (principal.key_id, principal.tpm)
        decision = self._acquire(principal)
        if not decision.allowed:
            raise RequestRejected(
                429,
                f"rate limit reached for {principal.subject} "
                f"(rpm {principal.rpm or '-'}, tpm {principal.tpm or '-'}); retry after "
                f"{decision.headers()['retry-after']} s",
                code="rate_limit_exceeded",
                headers=decision.headers(),
                reason="rate_limited",
            )
        return decision.headers()

    def _acquire(self, principal: Principal) -> Decision:
        try:
            return self.limiter.acquire(principal.key_id, principal.rpm, principal.tpm)
        except Exception as exc:  # a Redis outage must not take the server down
            if self._fallback is None:
                log.warning("rate limiter unavailable, limiting in-process meanwhile: %s", exc)
                self._fallback = MemoryLimiter()
            return self._fallback.acquire(principal.key_id, principal.rpm, principal.tpm)

    def debit(self, subject: str | None, tokens: int) -> None:
        """Charge a finished request's tokens to its principal's bucket."""
        with self._lock:
            found = self._tpm.get(subject or "")
        if found is None or tokens <= 0:
            return
        bucket, tpm = found
        try:
            self.limiter.debit(bucket, tpm, tokens)
        except Exception:  # same outage as in _acquire; counted in-process meanwhile
            if self._fallback is not None:
                self._fallback.debit(bucket, tpm, tokens)


#: Fields of an admin-route request written to the audit log.
ADMIN_FIELDS = ("principal", "method", "route", "model", "status", "latency_ms")


def admin_event(method: str, route: str) -> tuple[str, dict[str, Any]]:
    """The audit event of an admin request: ``adapter.load`` / ``adapter.unload`` (with the
    adapter id) for the adapter routes, else ``admin``."""
    if route == "/admin/adapters" and method == "POST":
        return "adapter.load", {}
    if route.startswith("/admin/adapters/") and method == "DELETE":
        return "adapter.unload", {"adapter": route.removeprefix("/admin/adapters/")}
    return "admin", {}


class UsageObserver:
    """Debits used tokens and writes request / admin records to the audit log."""

    def __init__(
        self,
        guard: PolicyGuard,
        audit: AuditLog | None,
        audit_requests: bool,
        audit_prompts: bool = False,
    ) -> None:
        self.guard, self.audit, self.audit_requests = guard, audit, audit_requests
        self.audit_prompts = audit_prompts

    def observe(self, record: RequestRecord) -> None:
        """Called by the server's observer thread once per finished request."""
        tokens = record.input_tokens + record.output_tokens
        if record.status < 400:
            self.guard.debit(record.principal, tokens)
        admin = record.route.startswith("/admin/")
        if self.audit is None or not (admin or self.audit_requests):
            return
        fields: dict[str, Any] = {
            "principal": record.principal,
            "method": record.method,
            "route": record.route,
            "model": record.model,
            "version": record.version,
            "status": record.status,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "cached": record.cached,
            "latency_ms": round(record.latency_s * 1000, 3),
        }
        event = "admin" if admin else "request"
        if admin:
            event, extra = admin_event(record.method, record.route)
            fields = {k: fields[k] for k in ADMIN_FIELDS} | extra
        if self.audit_prompts and record.prompt_ids:
            # Token ids, not text: asked for explicitly (--audit-prompts), off by default.
            fields["prompt_ids"] = [list(ids) for ids in record.prompt_ids]
        self.audit.write(event, **fields)

    def close(self) -> None:
        """Write ``server.stop`` and close the audit log at shutdown."""
        if self.audit is not None:
            self.audit.write("server.stop", actor="server")
            self.audit.close()


def model_check(
    path: Path, trust: TrustPolicy | None, allow_pickle: bool, audit: AuditLog | None
) -> None:
    """Refuse a model / adapter directory that fails the trust policy or the pickle guard.

    Raises:
        SecurityError: unsigned / tampered / untrusted, or an unscanned or unsafe pickle.
    """
    from modelkiln.security.pickles import check_checkpoint

    write: Callable[..., None] = audit.write if audit is not None else (lambda *a, **k: None)
    kind = "adapter" if (Path(path) / "adapter_config.json").is_file() else "model"
    try:
        signer = trust.check(path) if trust is not None else None
        pickles = check_checkpoint(path, allow_pickle)
    except SecurityError as exc:
        write("model.refused", path=str(path), kind=kind, reason=exc.message)
        raise
    if pickles:
        write("model.pickle_allowed", path=str(path), kind=kind, files=[p.name for p in pickles])
    write("model.accepted", path=str(path), kind=kind, signer=str(signer) if signer else None)


def encrypted_model_loader(path: Path, key_file: Path) -> Any:
    """The torch model of a directory of ``*.safetensors.enc`` weights, decrypted in memory
    (None for any other directory: the server's own loader reads it)."""
    from modelkiln.security.encryption import SUFFIX, load_hf_model_encrypted

    if not any(Path(path).glob("*.safetensors" + SUFFIX)):
        return None
    return load_hf_model_encrypted(path, key_file)


def encrypted_onnx_loader(path: Path, key_file: Path, threads: int | None) -> Any:
    """The ONNX Runtime session of a directory with an encrypted graph (``*.onnx.enc``),
    decrypted in memory (None for any other directory)."""
    from modelkiln.security.encryption import onnx_session_from_dir

    return onnx_session_from_dir(path, key_file, threads)
