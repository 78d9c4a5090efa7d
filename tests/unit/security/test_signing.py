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


def test_ed25519_keys_sign_and_verify_in_the_oms_format(model: Path, tmp_path: Path) -> None:
    import base64

    pub = generate_signing_key(tmp_path / "ed.pem", "ed25519")
    assert "BEGIN PUBLIC KEY" in pub.read_text()
    sig = sign_model(model, tmp_path / "ed.pem")
    bundle = json.loads(sig.read_text())  # a Sigstore bundle with a DSSE envelope, as for EC
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicateType"].startswith("https://model_signing/")
    verify_model(model, pub)
    ec_pub = generate_signing_key(tmp_path / "ec.pem")
    with pytest.raises(SecurityError, match="signature check"):
        verify_model(model, ec_pub)  # another key's signature is refused either way
    policy = TrustPolicy(public_keys=[ec_pub, pub])
    assert policy.check(model) == pub
    (model / "adapter_model.safetensors").write_bytes(b"\x01" * 256)
    with pytest.raises(SecurityError, match="adapter_model.safetensors"):
        verify_model(model, pub)


def test_unsupported_keys_get_one_clear_error(model: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    pem = serialization.PrivateFormat.PKCS8
    for name, key in (
        ("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("k1", ec.generate_private_key(ec.SECP256K1())),
    ):
        path = tmp_path / f"{name}.pem"
        enc = serialization.NoEncryption()
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, pem, enc))
        with pytest.raises(
            SecurityError, match="takes EC keys on P-256 / P-384 / P-521 or Ed25519"
        ):
            sign_model(model, path)
    with pytest.raises(SecurityError, match="cannot read the private key"):
        sign_model(model, model / "adapter_config.json")
