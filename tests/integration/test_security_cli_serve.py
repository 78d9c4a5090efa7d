"""``python -m modelkiln.serve`` with the security flags, as a real process: a signed tiny
GPT-2 under a trust policy, a key store and an audit log (the same model unsigned is refused
at start with one clear error). Every admin action reaches the hash-chained log: the start,
a signed adapter's load and unload, a key revoked by ``kiln keys --audit-log`` (another
process writing the same file) and the server's re-read of the key store, the refused
requests, and the stop; ``kiln audit verify`` finds the chain intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, start_process, stop_process
from typer.testing import CliRunner

from modelkiln.cli import app as cli
from modelkiln.errors import ServingError
from modelkiln.security.keys import KeyStore
from modelkiln.security.serving import SecurityPolicy
from modelkiln.security.signing import TrustPolicy, generate_signing_key, sign_model
from modelkiln.serve import ModelServer, ServeConfig


def _adapter(model: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lora = LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model), lora).save_pretrained(str(out))
    return out


def _serve(tmp_path: Path, model: Path, port: int) -> Any:
    return start_process(
        ["--model-path", str(model), "--name", "lm", "--precision", "fp32",
         "--key-store", str(tmp_path / "keys.json"),
         "--trust-policy", str(tmp_path / "trust.json"),
         "--audit-log", str(tmp_path / "audit.jsonl"), "--audit-fsync", "0"],
        port, timeout=120,
    )  # fmt: skip


def test_kiln_serve_with_keys_trust_policy_and_audit(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    model = save_tiny_gpt2(tmp_path / "lm")
    adapter = _adapter(model, tmp_path / "sql")
    pub = generate_signing_key(tmp_path / "signer.pem")
    (tmp_path / "trust.json").write_text(json.dumps({"public_keys": [str(pub)]}))
    store = KeyStore(tmp_path / "keys.json")
    admin, admin_rec = store.create("admin")
    user, user_rec = store.create("infer")
    cfg = ServeConfig.model_validate(
        {"models": [{"path": str(model), "precision": "fp32"}], "port": 0}
    )
    policy = SecurityPolicy(trust=TrustPolicy.load(tmp_path / "trust.json"))
    with pytest.raises(ServingError, match="is not signed"):
        ModelServer(config=cfg, hooks=policy.hooks()).start(timeout=60)

    sign_model(model, tmp_path / "signer.pem")
    sign_model(adapter, tmp_path / "signer.pem")
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    proc = _serve(tmp_path, model, port)
    url = f"http://127.0.0.1:{port}"
    as_admin = {"Authorization": f"Bearer {admin}"}
    as_user = {"Authorization": f"Bearer {user}"}
    body = {"model": "lm", "prompt": "def f(", "max_tokens": 3}
    try:
        anonymous = httpx.post(url + "/v1/completions", json=body, timeout=30)
        ok = httpx.post(url + "/v1/completions", json=body, headers=as_user, timeout=30)
        load = httpx.post(url + "/admin/adapters", headers=as_admin, timeout=60,
                          json={"name": "sql", "path": str(adapter)})  # fmt: skip
        unload = httpx.delete(url + "/admin/adapters/lm:sql", headers=as_admin, timeout=60)
        revoke = ["keys", "revoke", user_rec.id, "--store", str(tmp_path / "keys.json")]
        revoked = CliRunner().invoke(cli, [*revoke, "--audit-log", str(audit)])
        refused = httpx.post(url + "/v1/completions", json=body, headers=as_user, timeout=30)
    finally:
        stop_process(proc)
    assert anonymous.status_code == 401 and ok.status_code == 200, ok.text
    assert load.status_code == 201 and unload.status_code == 200, (load.text, unload.text)
    assert revoked.exit_code == 0 and refused.status_code == 401, revoked.output
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[:2] == ["server.start", "model.accepted"] and names[-1] == "server.stop", names
    assert "auth.failure" in names and "request" in names
    by = {e["event"]: e for e in events}
    assert by["server.start"]["key_store"] == str(tmp_path / "keys.json")
    accepted = {e["kind"]: e["path"] for e in events if e["event"] == "model.accepted"}
    assert accepted == {"model": str(model), "adapter": str(adapter)}
    assert (by["adapter.load"]["status"], by["adapter.load"]["principal"]) == (
        201, f"key:{admin_rec.id}")  # fmt: skip
    assert (by["adapter.unload"]["adapter"], by["adapter.unload"]["status"]) == ("lm:sql", 200)
    assert (by["key.revoke"]["key_id"], by["key.revoke"]["actor"]) == (user_rec.id, "cli")
    reload = by["config.reload"]
    assert (reload["what"], reload["revoked"], reload["added"]) == ("key_store", [user_rec.id], [])
    assert names.index("key.revoke") < names.index("config.reload")
    assert names.index("config.reload") < len(names) - 1 - names[::-1].index("auth.failure")
    verified = CliRunner().invoke(cli, ["audit", "verify", str(audit), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"], verified.output
