"""model_signing (OMS, local EC key): sign, verify, tamper, untrusted key, trust policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkiln.errors import SecurityError
from modelkiln.security.signing import (
    TrustPolicy,
    generate_signing_key,
    sign_model,
    signature_path,
    verify_model,
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4}')
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 256)
    return d


def test_sign_verify_and_tamper(model: Path, tmp_path: Path) -> None:
    pub = generate_signing_key(tmp_path / "signer.pem")
    sig = sign_model(model, tmp_path / "signer.pem")
    assert sig == signature_path(model) == model / "model.sig"
    verify_model(model, pub)
    (model / "adapter_model.safetensors").write_bytes(b"\x01" * 256)
    with pytest.raises(SecurityError, match="adapter_model.safetensors"):
        verify_model(model, pub)


def test_added_file_and_missing_signature_are_refused(model: Path, tmp_path: Path) -> None:
    pub = generate_signing_key(tmp_path / "signer.pem")
    with pytest.raises(SecurityError, match="is not signed"):
        verify_model(model, pub)
    sign_model(model, tmp_path / "signer.pem")
    (model / "extra.py").write_text("import os")
    with pytest.raises(SecurityError, match="extra.py"):
        verify_model(model, pub)


def test_trust_policy_refuses_untrusted_signers(model: Path, tmp_path: Path) -> None:
    trusted = generate_signing_key(tmp_path / "trusted.pem")
    generate_signing_key(tmp_path / "rogue.pem")
    (tmp_path / "policy.json").write_text(json.dumps({"public_keys": [trusted.name]}))
    policy = TrustPolicy.load(tmp_path / "policy.json")
    sign_model(model, tmp_path / "rogue.pem")
    with pytest.raises(SecurityError, match="untrusted key"):
        policy.check(model)
    sign_model(model, tmp_path / "trusted.pem")
    assert policy.check(model) == trusted


def test_single_file_signature(tmp_path: Path) -> None:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"onnx")
    pub = generate_signing_key(tmp_path / "k.pem")
    assert sign_model(f, tmp_path / "k.pem") == tmp_path / "model.onnx.sig"
    verify_model(f, pub)
