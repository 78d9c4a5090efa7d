"""The security plug-in against a real server on loopback: keys (expired, revoked, wrong scope,
model allowlist), per-key tpm limits with 429 + headers while another key is unaffected, JWTs
(wrong audience), and an audit log whose edited line ``kiln audit verify`` finds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from serve_support import FakeEngine
from typer.testing import CliRunner

from modelkiln.cli import app as cli
from modelkiln.security.audit import AuditLog
from modelkiln.security.jwt_auth import JWTAuthenticator, JWTConfig
from modelkiln.security.keys import KeyStore
from modelkiln.security.serving import SecurityPolicy
from modelkiln.serve import ModelServer, ServeConfig

SECRET = "jwt-shared-secret-of-at-least-32-chars"
BODY = {"model": "lm", "prompt": "def f(", "max_tokens": 5, "temperature": 0.7}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = KeyStore(tmp_path / "keys.json")
    keys = {
        "limited": store.create("infer", models=["lm"], tpm=20)[0],
        "other": store.create("infer", tpm=1000)[0],
        "embed": store.create("embed")[0],
        "expired": store.create("infer", expires_in_s=1)[0],
        "revoked": store.create("infer")[0],
    }
    audit = AuditLog(tmp_path / "audit.jsonl", fsync_interval_s=0, checkpoint_every=10)
    policy = SecurityPolicy(
        keys=KeyStore(tmp_path / "keys.json"),  # the server's own reader of the file
        jwt=JWTAuthenticator(JWTConfig(secret=SECRET, audience="kiln")),
        audit=audit,
    )
    cfg = ServeConfig.model_validate(
        {
            "models": [{"path": "fake", "name": "lm"}, {"path": "fake2", "name": "lm2"}],
            "port": 0,
            "cache": {"enabled": False},
        }
    )
    server = ModelServer(
        config=cfg, engines={"lm": FakeEngine(), "lm2": FakeEngine()}, hooks=policy.hooks()
    )
    url = server.start(timeout=30)
    try:
        yield {"url": url, "keys": keys, "store": store, "server": server, "tmp": tmp_path}
    finally:
        server.stop()


def _post(
    s: dict[str, Any],
    key: str | None,
    body: dict[str, Any] | None = None,
    route: str = "/v1/completions",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(s["url"] + route, json=body or BODY, headers=headers, timeout=10)


def _flush(s: dict[str, Any]) -> None:
    assert s["server"]._server.kiln_state.observers.flush(5)


def test_expired_revoked_and_wrong_scope_keys(secured: dict[str, Any]) -> None:
    s, keys = secured, secured["keys"]
    assert _post(s, keys["revoked"]).status_code == 200
    s["store"].revoke(s["store"].list()[4].id)  # while the server runs
    time.sleep(1.1)  # the 'expired' key's lifetime is 1 s
    for name in ("expired", "revoked"):
        r = _post(s, keys[name])
        assert r.status_code == 401, r.text
        assert name in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert _post(s, None).status_code == 401
    assert _post(s, "mk_000000000000_" + "x" * 43).status_code == 401
    wrong_scope = _post(s, keys["embed"])
    assert wrong_scope.status_code == 403
    assert wrong_scope.json()["error"]["code"] == "insufficient_scope"
    assert wrong_scope.json()["error"]["type"] == "permission_error"
    not_allowed = _post(s, keys["limited"], BODY | {"model": "lm2"})
    assert not_allowed.status_code == 403
    assert not_allowed.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(
        s["url"] + "/v1/models", headers={"Authorization": f"Bearer {keys['embed']}"}
    )
    assert models.status_code == 200  # any valid credential lists the models
    assert httpx.get(s["url"] + "/health").status_code == 200


def test_key_over_its_tpm_gets_429_and_another_key_is_not_affected(
    secured: dict[str, Any],
) -> None:
    s, keys = secured, secured["keys"]
    first = _post(s, keys["limited"])
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"
    used = first.json()["usage"]["total_tokens"]
    refused = None
    for _ in range(20 // used + 2):  # bounded: the bucket holds 20 tokens
        _flush(s)
        r = _post(s, keys["limited"])
        if r.status_code == 429:
            refused = r
            break
        assert r.status_code == 200
    assert refused is not None, "the tpm limit never refused"
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-tokens"] == "20"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    other = _post(s, keys["other"])
    assert other.status_code == 200
    assert other.headers["x-ratelimit-limit-tokens"] == "1000"


def test_jwt_audience_and_audit_log_tampering(secured: dict[str, Any]) -> None:
    s = secured
    now = int(time.time())
    good = jwt.encode({"sub": "ana", "aud": "kiln", "exp": now + 60, "scope": "infer"}, SECRET)
    wrong_aud = jwt.encode({"sub": "ana", "aud": "other", "exp": now + 60}, SECRET)
    assert _post(s, good).status_code == 200
    r = _post(s, wrong_aud)
    assert r.status_code == 401 and "audience" in r.json()["error"]["message"].lower()
    _flush(s)
    path = s["tmp"] / "audit.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    ok = [e for e in events if e["event"] == "request" and e["status"] == 200]
    assert ok[-1]["principal"] == "jwt:ana" and ok[-1]["route"] == "/v1/completions"
    assert "def f(" not in path.read_text()  # prompts are not logged
    assert any(e["event"] == "auth.failure" for e in events)
    runner = CliRunner()
    assert runner.invoke(cli, ["audit", "verify", str(path)]).exit_code == 0
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"route":"/v1/completions"', '"route":"/v1/embeddings"')
    path.write_text("".join(lines))
    res = runner.invoke(cli, ["audit", "verify", str(path)])
    assert res.exit_code == 1 and "line 1: edited" in res.output
