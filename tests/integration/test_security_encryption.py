"""Encrypted weights served by a real server: ``kiln encrypt`` the tiny GPT-2's weights (the
plaintext removed), decrypt in memory with the right key and serve the same greedy text as
the plaintext model; the wrong key or a flipped byte fails with a clear error."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serve_support import code_tokenizer, save_tiny_gpt2
from typer.testing import CliRunner

from modelkiln.cli import app as cli
from modelkiln.errors import SecurityError, ServingError
from modelkiln.security.encryption import generate_key_file, load_hf_model_encrypted
from modelkiln.serve import ModelServer, ServeConfig

BODY = {"model": "lm", "prompt": [5, 17, 42], "max_tokens": 6, "temperature": 0}


def _serve_greedy(model: object) -> str:
    from modelkiln.serve.generation import ContinuousBatchingEngine, TorchCausalLMBackend

    engine = ContinuousBatchingEngine(
        TorchCausalLMBackend(model), code_tokenizer(), model_name="lm", max_num_seqs=2
    )
    cfg = ServeConfig.model_validate(
        {"models": [{"path": "x", "name": "lm"}], "port": 0, "drain_timeout_s": 2}
    )
    server = ModelServer(config=cfg, engines={"lm": engine})
    url = server.start(timeout=60)
    try:
        r = httpx.post(url + "/v1/completions", json=BODY, timeout=30)
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_encrypted_model_serves_with_the_right_key_and_fails_cleanly(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_gpt2(tmp_path / "model")
    expected = _serve_greedy(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    keys = tmp_path / "keys"
    keys.mkdir()
    res = CliRunner().invoke(
        cli,
        [
            "encrypt",
            str(model_dir),
            "--generate-key",
            str(keys / "model.key"),
            "--remove-plaintext",
        ],
    )
    assert res.exit_code == 0, res.output
    assert not list(model_dir.glob("*.safetensors"))
    files_before = sorted(p.name for p in model_dir.iterdir())

    model = load_hf_model_encrypted(model_dir, keys / "model.key")
    assert _serve_greedy(model) == expected
    assert sorted(p.name for p in model_dir.iterdir()) == files_before  # nothing written

    generate_key_file(keys / "wrong.key")
    with pytest.raises(SecurityError, match="wrong key, or the file was changed"):
        load_hf_model_encrypted(model_dir, keys / "wrong.key")
    enc = model_dir / "model.safetensors.enc"
    blob = bytearray(enc.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    enc.write_bytes(bytes(blob))
    with pytest.raises(SecurityError, match="model.safetensors"):
        load_hf_model_encrypted(model_dir, keys / "model.key")


def test_server_decrypts_with_decrypt_key_file_and_refuses_the_wrong_key(tmp_path: Path) -> None:
    from modelkiln.security.encryption import encrypt_path
    from modelkiln.security.serving import SecurityPolicy

    model_dir = save_tiny_gpt2(tmp_path / "lm")
    key = generate_key_file(tmp_path / "model.key")
    encrypt_path(model_dir, key, remove_plaintext=True)
    cfg = ServeConfig.model_validate(
        {
            "models": [{"path": str(model_dir), "name": "lm", "precision": "fp32"}],
            "port": 0,
            "drain_timeout_s": 2,
        }
    )
    server = ModelServer(config=cfg, hooks=SecurityPolicy(decrypt_key_file=key).hooks())
    url = server.start(timeout=120)
    try:
        r = httpx.post(url + "/v1/completions", json=BODY, timeout=30)
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    assert not list(model_dir.glob("*.safetensors"))  # no plaintext was written
    wrong = SecurityPolicy(decrypt_key_file=generate_key_file(tmp_path / "wrong.key"))
    with pytest.raises(ServingError, match="wrong key, or the file was changed"):
        ModelServer(config=cfg, hooks=wrong.hooks()).start(timeout=120)
