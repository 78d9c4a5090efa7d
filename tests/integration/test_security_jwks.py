"""JWKS from a URL served on loopback: RS256 tokens verify, a key rotated in at the identity
provider is picked up, and an identity-provider outage keeps the known keys working."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from modelkiln.errors import SecurityError
from modelkiln.security.jwt_auth import JWTAuthenticator, JWTConfig

JWKS: dict[str, Any] = {"keys": []}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.server.down:  # type: ignore[attr-defined]
            self.send_error(503)
            return
        body = json.dumps(JWKS).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def idp() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    server.down = False  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _key(kid: str) -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": kid}
    return key, jwk


def _token(key: Any, kid: str) -> str:
    claims = {"sub": kid, "aud": "kiln", "iss": "https://idp", "exp": int(time.time()) + 60}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_jwks_url_rotation_and_outage(idp: http.server.HTTPServer) -> None:
    k1, jwk1 = _key("k1")
    JWKS["keys"] = [jwk1]
    url = f"http://127.0.0.1:{idp.server_address[1]}/jwks.json"
    auth = JWTAuthenticator(
        JWTConfig(
            jwks_url=url,
            audience="kiln",
            issuer="https://idp",
            jwks_refresh_s=1e-3,
            jwks_min_retry_s=0,
        )
    )
    assert auth.authenticate(_token(k1, "k1")).subject == "jwt:k1"
    k2, jwk2 = _key("k2")
    JWKS["keys"] = [jwk1, jwk2]  # the provider rotates a key in
    assert auth.authenticate(_token(k2, "k2")).subject == "jwt:k2"
    idp.down = True  # type: ignore[attr-defined]
    assert auth.authenticate(_token(k1, "k1")).subject == "jwt:k1"  # known keys still work
    k3, _ = _key("k3")
    with pytest.raises(SecurityError, match="unknown JWT key id"):
        auth.authenticate(_token(k3, "k3"))
