"""``python -m modelkiln.serve`` with the security flags, as a real process: a signed tiny
GPT-2 under a trust policy, a key store and an audit log; the same model unsigned is refused
at start with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, start_process

from modelkiln.contract.audit import verify_audit_log
from modelkiln.errors import ServingError
from modelkiln.security.keys import KeyStore
from modelkiln.security.serving import SecurityPolicy
from modelkiln.security.signing import TrustPolicy, generate_signing_key, sign_model
from modelkiln.serve import ModelServer, ServeConfig


def test_kiln_serve_with_keys_trust_policy_and_audit(tmp_path: Path) -> None:
    model = save_tiny_gpt2(tmp_path / "lm")
    pub = generate_signing_key(tmp_path / "signer.pem")
    (tmp_path / "trust.json").write_text(json.dumps({"public_keys": [str(pub)]}))
    key, _ = KeyStore(tmp_path / "keys.json").create("infer")
    cfg = ServeConfig.model_validate(
        {"models": [{"path": str(model), "precision": "fp32"}], "port": 0}
    )
    policy = SecurityPolicy(trust=TrustPolicy.load(tmp_path / "trust.json"))
    with pytest.raises(ServingError, match="is not signed"):
        ModelServer(config=cfg, hooks=policy.hooks()).start(timeout=60)

    sign_model(model, tmp_path / "signer.pem")
    port = free_port()
    proc = start_process(
        [
            "--model-path",
            str(model),
            "--name",
            "lm",
            "--precision",
            "fp32",
            "--key-store",
            str(tmp_path / "keys.json"),
            "--trust-policy",
            str(tmp_path / "trust.json"),
            "--audit-log",
            str(tmp_path / "audit.jsonl"),
            "--audit-fsync",
            "0",
        ],
        port,
        timeout=120,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "lm", "prompt": "def f(", "max_tokens": 3}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        proc.terminate()
        proc.wait(30)
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").open()]
    assert events[:2] == ["server.start", "model.accepted"]
    assert "auth.failure" in events and "request" in events
    assert verify_audit_log(tmp_path / "audit.jsonl").ok
