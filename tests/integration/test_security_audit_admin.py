"""Every admin action of a real ``kiln serve --audit-log`` reaches the hash-chained log: the
start, adapter load and unload, a key revoked by ``kiln keys --audit-log`` (another process
writing the same file) and the server's re-read of the key store, the refused request, and
the stop; ``kiln audit verify`` finds the chain intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, start_process, stop_process
from typer.testing import CliRunner

from modelkiln.cli import app as cli
from modelkiln.security.keys import KeyStore

pytest.importorskip("peft")


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
         "--key-store", str(tmp_path / "keys.json"), "--audit-log", str(tmp_path / "audit.jsonl"),
         "--audit-fsync", "0", "--no-audit-requests"],
        port, timeout=120,
    )  # fmt: skip


def test_admin_actions_and_key_changes_reach_the_audit_log(tmp_path: Path) -> None:
    model = save_tiny_gpt2(tmp_path / "lm")
    adapter = _adapter(model, tmp_path / "sql")
    store = KeyStore(tmp_path / "keys.json")
    admin, admin_rec = store.create("admin")
    user, user_rec = store.create("infer")
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    proc = _serve(tmp_path, model, port)
    url = f"http://127.0.0.1:{port}"
    as_admin = {"Authorization": f"Bearer {admin}"}
    body = {"model": "lm", "prompt": [5, 17], "max_tokens": 2, "temperature": 0}
    try:
        load = httpx.post(url + "/admin/adapters", headers=as_admin, timeout=60,
                          json={"name": "sql", "path": str(adapter)})  # fmt: skip
        unload = httpx.delete(url + "/admin/adapters/lm:sql", headers=as_admin, timeout=60)
        ok = httpx.post(url + "/v1/completions", json=body, timeout=30,
                        headers={"Authorization": f"Bearer {user}"})  # fmt: skip
        revoke = ["keys", "revoke", user_rec.id, "--store", str(tmp_path / "keys.json")]
        revoked = CliRunner().invoke(cli, [*revoke, "--audit-log", str(audit)])
        refused = httpx.post(url + "/v1/completions", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {user}"})  # fmt: skip
    finally:
        stop_process(proc)
    assert load.status_code == 201 and unload.status_code == 200, (load.text, unload.text)
    assert ok.status_code == 200 and revoked.exit_code == 0, revoked.output
    assert refused.status_code == 401
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "server.start" and names[-1] == "server.stop", names
    assert "request" not in names  # --no-audit-requests: admin actions only
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
    assert names.index("key.revoke") < names.index("config.reload") < names.index("auth.failure")
    verified = CliRunner().invoke(cli, ["audit", "verify", str(audit), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"], verified.output
