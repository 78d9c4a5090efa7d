"""Signed runtime adapters with a trust policy, against a real server: a tampered adapter and
one signed by an untrusted key are refused at load (audited), an unsigned one too, and the
server keeps serving the base model and the trusted adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import code_tokenizer

from modelkiln.security.audit import AuditLog, verify_audit_log
from modelkiln.security.keys import KeyStore
from modelkiln.security.serving import SecurityPolicy
from modelkiln.security.signing import TrustPolicy, generate_signing_key, sign_model
from modelkiln.serve import ModelServer, ServeConfig

pytest.importorskip("peft")


def _base() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(code_tokenizer()),
        max_position_embeddings=64,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def _adapters(root: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, name in enumerate(["good", "tampered", "rogue", "unsigned"]):
        torch.manual_seed(100 + i)
        lora = LoraConfig(
            r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        get_peft_model(_base(), lora).save_pretrained(str(root / name))
        out[name] = root / name
    return out


def test_trust_policy_refuses_bad_adapters_and_keeps_serving(tmp_path: Path) -> None:
    from modelkiln.serve.generation import ContinuousBatchingEngine, TorchCausalLMBackend

    ads = _adapters(tmp_path / "adapters")
    trusted = generate_signing_key(tmp_path / "trusted.pem")
    generate_signing_key(tmp_path / "rogue.pem")
    for name in ("good", "tampered"):
        sign_model(ads[name], tmp_path / "trusted.pem")
    sign_model(ads["rogue"], tmp_path / "rogue.pem")
    weights = ads["tampered"] / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    (tmp_path / "trust.json").write_text(json.dumps({"public_keys": [str(trusted)]}))

    store = KeyStore(tmp_path / "keys.json")
    admin, _ = store.create("admin")
    user, _ = store.create("infer")
    audit = AuditLog(tmp_path / "audit.jsonl", fsync_interval_s=0)
    policy = SecurityPolicy(
        keys=store, audit=audit, trust=TrustPolicy.load(tmp_path / "trust.json")
    )
    engine = ContinuousBatchingEngine(
        TorchCausalLMBackend(_base()), code_tokenizer(), model_name="lm", max_num_seqs=4
    )
    cfg = ServeConfig.model_validate(
        {"models": [{"path": "x", "name": "lm"}], "port": 0, "drain_timeout_s": 2}
    )
    server = ModelServer(config=cfg, engines={"lm": engine}, hooks=policy.hooks())
    url = server.start(timeout=60)
    auth = {"Authorization": f"Bearer {admin}"}
    try:
        loads = {
            name: httpx.post(
                url + "/admin/adapters",
                headers=auth,
                timeout=30,
                json={"name": name, "path": str(path)},
            )
            for name, path in ads.items()
        }
        as_user = httpx.post(
            url + "/admin/adapters",
            timeout=30,
            headers={"Authorization": f"Bearer {user}"},
            json={"name": "x", "path": str(ads["good"])},
        )
        body = {"model": "lm:good", "prompt": [5, 17, 42], "max_tokens": 4, "temperature": 0}
        with_adapter = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=30)
        base = httpx.post(
            url + "/v1/completions", json=body | {"model": "lm"}, headers=auth, timeout=30
        )
    finally:
        server.stop()
    assert loads["good"].status_code == 201, loads["good"].text
    for name, why in (
        ("tampered", "adapter_model.safetensors"),
        ("rogue", "untrusted"),
        ("unsigned", "is not signed"),
    ):
        assert loads[name].status_code == 400, loads[name].text
        assert why in loads[name].json()["error"]["message"], loads[name].text
    assert with_adapter.status_code == 200 and base.status_code == 200
    assert as_user.status_code == 403  # an infer key cannot use the admin API
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [e["path"] for e in events if e["event"] == "model.refused"]
    assert sorted(Path(p).name for p in refused) == ["rogue", "tampered", "unsigned"]
    admin_actions = [(e["route"], e["status"]) for e in events if e["event"] == "adapter.load"]
    assert ("/admin/adapters", 201) in admin_actions and ("/admin/adapters", 400) in admin_actions
    assert verify_audit_log(tmp_path / "audit.jsonl").ok
