"""JWTs minted with PyJWT and cryptography keys: HS256, RS256 / ES256 via JWKS, claims, refresh."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from modelkiln.errors import SecurityError
from modelkiln.security.jwt_auth import JWKSCache, JWTAuthenticator, JWTConfig, mint_hs256

S = "k" * 32


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algo = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(key, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
    )
    return json.loads(algo.to_jwk(key.public_key())) | {"kid": kid}


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "ana", "iss": "https://idp", "aud": "kiln", "iat": now, "exp": now + 600} | extra


def test_hs256_minted_token_maps_claims() -> None:
    token = mint_hs256(
        "s3cret-s3cret-s3cret-s3cret-s3cret",
        sub="ana",
        expires_in_s=60,
        audience="kiln",
        scopes=["embed"],
        models=["mini"],
        tpm=500,
    )
    p = JWTAuthenticator(
        JWTConfig(secret="s3cret-s3cret-s3cret-s3cret-s3cret", audience="kiln")
    ).authenticate(token)
    assert p.subject == "jwt:ana" and p.scopes == {"embed"} and p.models == ("mini",)
    assert p.tpm == 500 and p.rpm is None


@pytest.mark.parametrize("curve", ["rsa", "ec"])
def test_rs256_es256_against_jwks_file(tmp_path: Path, curve: str) -> None:
    key = (
        rsa.generate_private_key(65537, 2048)
        if curve == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    alg = "RS256" if curve == "rsa" else "ES256"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [_jwk(key, "k1")]}))
    auth = JWTAuthenticator(
        JWTConfig(jwks_file=tmp_path / "jwks.json", issuer="https://idp", audience="kiln")
    )
    good = jwt.encode(_claims(scope="infer admin"), key, algorithm=alg, headers={"kid": "k1"})
    assert auth.authenticate(good).scopes == {"infer", "embed", "admin"}
    wrong_aud = jwt.encode(_claims(aud="other"), key, algorithm=alg, headers={"kid": "k1"})
    with pytest.raises(SecurityError, match="(?i)audience"):
        auth.authenticate(wrong_aud)
    wrong_iss = jwt.encode(_claims(iss="https://evil"), key, algorithm=alg, headers={"kid": "k1"})
    with pytest.raises(SecurityError, match="(?i)issuer"):
        auth.authenticate(wrong_iss)


def test_expiry_and_not_before_respect_the_leeway() -> None:
    auth = JWTAuthenticator(JWTConfig(secret=S, leeway_s=30))
    now = int(time.time())
    barely = jwt.encode({"sub": "a", "exp": now - 10}, S, algorithm="HS256")
    assert auth.authenticate(barely).subject == "jwt:a"
    expired = jwt.encode({"sub": "a", "exp": now - 60}, S, algorithm="HS256")
    with pytest.raises(SecurityError, match="(?i)expired"):
        auth.authenticate(expired)
    future = jwt.encode({"sub": "a", "exp": now + 600, "nbf": now + 120}, S, algorithm="HS256")
    with pytest.raises(SecurityError, match="(?i)not yet valid"):
        auth.authenticate(future)


def test_forged_and_none_tokens_are_refused() -> None:
    auth = JWTAuthenticator(JWTConfig(secret=S))
    forged = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "o" * 32, algorithm="HS256")
    with pytest.raises(SecurityError, match="Signature"):
        auth.authenticate(forged)
    unsigned = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(SecurityError, match="not accepted"):
        auth.authenticate(unsigned)
    with pytest.raises(ValueError, match="none"):
        JWTConfig(secret=S, algorithms=["none"])


def test_failed_refresh_keeps_known_keys_and_new_kid_triggers_refresh() -> None:
    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    served: dict[str, Any] = {"keys": [_jwk(k1, "k1")]}
    calls = {"n": 0, "fail": False}

    def fetch() -> dict[str, Any]:
        calls["n"] += 1
        if calls["fail"]:
            raise OSError("identity provider down")
        return served

    cfg = JWTConfig(jwks_url="https://idp/jwks", jwks_refresh_s=1e-6, jwks_min_retry_s=0)
    auth = JWTAuthenticator(cfg, JWKSCache(cfg, fetch=fetch))
    tok1 = jwt.encode(_claims(), k1, algorithm="ES256", headers={"kid": "k1"})
    assert auth.authenticate(tok1).subject == "jwt:ana"
    calls["fail"] = True
    assert auth.authenticate(tok1).subject == "jwt:ana"  # refresh failed, k1 still known
    assert calls["n"] >= 2
    calls["fail"] = False
    served["keys"].append(_jwk(k2, "k2"))
    tok2 = jwt.encode(_claims(sub="bo"), k2, algorithm="ES256", headers={"kid": "k2"})
    assert auth.authenticate(tok2).subject == "jwt:bo"
