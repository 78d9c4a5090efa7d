"""Bearer JWTs: HS256 with a shared secret, RS256 / ES256 against a JWKS file or URL.

PyJWT checks the signature, ``exp``, ``nbf``, ``iss`` and ``aud`` (with a
clock-skew leeway); claims map to a :class:`Principal`: ``scope`` (space- or
list-separated, as OAuth writes it), ``models``, ``rpm``, ``tpm``.

The JWKS is cached and refreshed every ``jwks_refresh_s`` (and at most once per
``jwks_min_retry_s`` when a token names an unknown ``kid``). A failed refresh
keeps the previous key set, so an identity provider outage does not lock out
callers whose keys are already known.

Example:
    >>> auth = JWTAuthenticator(JWTConfig(secret="s3cret", audience="kiln"))
    >>> token = mint_hs256("s3cret", sub="ana", audience="kiln", expires_in_s=3600)
    >>> auth.authenticate(token).subject
    'jwt:ana'
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from modelkiln.configbase import KilnModel
from modelkiln.contract.audit import AuditWriter
from modelkiln.errors import SecurityError
from modelkiln.security.keys import SCOPES, Principal

log = logging.getLogger(__name__)


class JWTConfig(KilnModel):
    """How bearer JWTs are checked and mapped to scopes, models and limits."""

    secret: str | None = Field(
        None, min_length=32, description="HS256 shared secret (32+ characters, RFC 7518)."
    )
    jwks_file: Path | None = Field(None, description="JWKS JSON file (RS256 / ES256 keys).")
    jwks_url: str | None = Field(None, description="JWKS URL of the identity provider.")
    issuer: str | None = Field(None, description="Required 'iss' claim (None: not checked).")
    audience: str | None = Field(None, description="Required 'aud' claim (None: not checked).")
    leeway_s: float = Field(30.0, ge=0, description="Clock skew allowed on exp / nbf / iat.")
    algorithms: list[str] = Field(
        default_factory=lambda: ["HS256", "RS256", "ES256"],
        description="Accepted algorithms ('none' is never accepted).",
    )
    default_scopes: list[str] = Field(
        default_factory=lambda: ["infer", "embed"],
        description="Scopes of a token with no 'scope' claim.",
    )
    jwks_refresh_s: float = Field(300.0, gt=0, description="Seconds between JWKS refreshes.")
    jwks_min_retry_s: float = Field(10.0, ge=0, description="Least seconds between retries.")

    @model_validator(mode="after")
    def _one_source(self) -> JWTConfig:
        if not (self.secret or self.jwks_file or self.jwks_url):
            raise ValueError("give secret (HS256), jwks_file or jwks_url")
        if "none" in (a.lower() for a in self.algorithms):
            raise ValueError("the 'none' algorithm is never accepted")
        return self


class JWKSCache:
    """A JWKS from a file or URL, refreshed in the background of requests."""

    def __init__(self, cfg: JWTConfig, fetch: Any = None) -> None:
        self.cfg = cfg
        self._fetch = fetch or self._default_fetch
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._loaded_at = 0.0
        self._tried_at = 0.0
        #: Where key-set changes are audited as ``config.reload`` (the server sets it).
        self.audit: AuditWriter | None = None

    def _default_fetch(self) -> dict[str, Any]:
        if self.cfg.jwks_file is not None:
            return dict(json.loads(Path(self.cfg.jwks_file).read_text()))
        import httpx

        resp = httpx.get(str(self.cfg.jwks_url), timeout=5.0)
        resp.raise_for_status()
        return dict(resp.json())

    def refresh(self) -> bool:
        """Fetch the key set; on failure keep the old one. Returns True on success."""
        import jwt

        self._tried_at = time.monotonic()
        try:
            jwks = jwt.PyJWKSet.from_dict(self._fetch())
        except Exception as exc:  # any fetch / parse failure keeps the previous keys
            log.warning("JWKS refresh failed (keeping %d known keys): %s", len(self._keys), exc)
            return False
        keys = {k.key_id or "": k for k in jwks.keys}
        if self.audit is not None and self._loaded_at and keys.keys() != self._keys.keys():
            self.audit.write(
                "config.reload", actor="server", what="jwks",
                source=str(self.cfg.jwks_file or self.cfg.jwks_url),
                added=sorted(keys.keys() - self._keys.keys()),
                removed=sorted(self._keys.keys() - keys.keys()), keys=len(keys),
            )  # fmt: skip
        self._keys = keys
        self._loaded_at = time.monotonic()
        return True

    def key(self, kid: str | None) -> Any:
        """The signing key of ``kid`` (refreshing when stale or unknown)."""
        now = time.monotonic()
        with self._lock:
            stale = now - self._loaded_at > self.cfg.jwks_refresh_s
            unknown = (kid or "") not in self._keys and not (kid is None and len(self._keys) == 1)
            may_retry = now - self._tried_at >= self.cfg.jwks_min_retry_s or not self._tried_at
            if (stale or unknown) and may_retry:
                self.refresh()
            if kid is None and len(self._keys) == 1:
                return next(iter(self._keys.values()))
            found = self._keys.get(kid or "")
        if found is None:
            raise SecurityError(f"unknown JWT key id {kid!r}", hint="check the JWKS")
        return found


class JWTAuthenticator:
    """Checks bearer JWTs and maps their claims to a :class:`Principal`."""

    def __init__(self, cfg: JWTConfig, jwks: JWKSCache | None = None) -> None:
        self.cfg = cfg
        self.jwks = jwks or (JWKSCache(cfg) if cfg.jwks_file or cfg.jwks_url else None)

    def _verification_key(self, token: str) -> tuple[Any, list[str]]:
        import jwt

        header = jwt.get_unverified_header(token)
        alg = header.get("alg", "")
        if alg not in self.cfg.algorithms:
            raise SecurityError(f"JWT algorithm {alg!r} is not accepted")
        if alg.startswith("HS"):
            if not self.cfg.secret:
                raise SecurityError("HS256 tokens are not accepted (no shared secret set)")
            return self.cfg.secret, [alg]
        if self.jwks is None:
            raise SecurityError(f"{alg} tokens need a JWKS", hint="set jwks_file or jwks_url")
        return self.jwks.key(header.get("kid")).key, [alg]

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid token.

        Raises:
            SecurityError: bad signature, expired, not yet valid, wrong issuer or audience.
        """
        import jwt

        try:
            key, algs = self._verification_key(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=algs,
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self.cfg.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise SecurityError(f"invalid JWT: {exc}") from None
        return claims_to_principal(claims, self.cfg.default_scopes)


def claims_to_principal(claims: dict[str, Any], default_scopes: list[str]) -> Principal:
    """Map ``sub``, ``scope``, ``models``, ``rpm``, ``tpm`` claims to a principal."""
    raw = claims.get("scope", claims.get("scp", default_scopes))
    scopes = set(raw.split() if isinstance(raw, str) else raw)
    if "admin" in scopes:
        scopes |= set(SCOPES)
    models = claims.get("models", [])
    if isinstance(models, str):
        models = [m for m in models.replace(",", " ").split() if m]
    sub = str(claims["sub"])
    try:
        return Principal(
            subject=f"jwt:{sub}",
            key_id=f"jwt:{sub}",
            scopes=frozenset(s for s in scopes if s in SCOPES),
            models=tuple(models),
            rpm=claims.get("rpm"),
            tpm=claims.get("tpm"),
        )
    except ValueError as exc:
        raise SecurityError(f"JWT claims do not map to a policy: {exc}") from None


def mint_hs256(
    secret: str,
    *,
    sub: str,
    expires_in_s: float,
    audience: str | None = None,
    issuer: str | None = None,
    scopes: list[str] | None = None,
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> str:
    """An HS256 token for ``sub`` (the handbook's ``generate_api_key``, with claims)."""
    import jwt

    if len(secret) < 32:
        raise SecurityError(
            "the HS256 secret is shorter than 32 characters",
            hint="use e.g. the output of: openssl rand -hex 32",
        )
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + int(expires_in_s)}
    optional = {
        "aud": audience,
        "iss": issuer,
        "models": models,
        "rpm": rpm,
        "tpm": tpm,
        "scope": " ".join(scopes) if scopes else None,
    }
    claims.update({k: v for k, v in optional.items() if v is not None})
    return str(jwt.encode(claims, secret, algorithm="HS256"))
