"""Ed25519 keys for :mod:`modelkiln.security.signing` (``model_signing`` takes EC keys only).

``model-signing`` 1.1.1's local-key signer and verifier
(``model_signing._signing.sign_ec_key``) accept elliptic-curve keys on P-256 / P-384 /
P-521 only: both call ``_check_supported_ec_key``, which reads ``key.curve`` (an Ed25519
key has none: ``AttributeError``), and both sign / verify with ECDSA. The OMS signature
format itself (a Sigstore bundle holding a DSSE envelope over the in-toto manifest, with
a SHA-256 hint of the public key) does not depend on the algorithm, so these subclasses
keep everything of the library (manifest, hashing, bundle, file format) and swap only the
two primitive calls for Ed25519.

Hand-written (no library signs OMS with Ed25519); the cost is that it builds on a private
module of ``model-signing``: a version whose internals differ gets a clear error, not a
wrong signature. ``model_signing``'s own CLI (``model_signing verify key``) refuses
Ed25519 public keys, so a model signed with Ed25519 verifies with ``kiln verify`` (or
``--trust-policy``), not with that CLI.
"""

from __future__ import annotations

import base64
import pathlib
from typing import Any

from modelkiln.errors import SecurityError


def _internals() -> tuple[Any, Any, Any, Any]:
    """The private ``model_signing`` modules these classes build on (checked, not assumed)."""
    try:
        from google.protobuf import json_format
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
        from sigstore_models import intoto
    except ImportError as exc:  # a model-signing release that moved its internals
        raise SecurityError(
            f"Ed25519 signing needs model-signing 1.1's internals: {exc}",
            hint="use an EC key (kiln keys signing-key), or model-signing 1.1.x",
        ) from None
    return sign_ec_key, sign_sigstore_pb, intoto, json_format


def ed25519_signer(private_key: pathlib.Path, password: str | None = None) -> Any:
    """A ``model_signing`` signer that signs the DSSE envelope with an Ed25519 key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    sign_ec_key, sigstore_pb, intoto, json_format = _internals()

    class Ed25519Signer(sign_ec_key.Signer):  # type: ignore[name-defined]
        def __init__(self, path: pathlib.Path, password: str | None) -> None:
            pw = password.encode() if password else None
            key = serialization.load_pem_private_key(path.read_bytes(), pw)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise SecurityError(f"{path} is not an Ed25519 private key")
            self._private_key = self._ed_key = key  # the parent's name: verification material

        def sign(self, payload: Any) -> Any:
            # The library's Signer.sign with ECDSA(hash) replaced by Ed25519's sign(data).
            raw = json_format.MessageToJson(payload.statement.pb).encode("utf-8")
            sig = self._ed_key.sign(sigstore_pb.pae(raw))
            envelope = intoto.Envelope(
                payload=base64.b64encode(raw),
                payload_type=sign_ec_key.signing._IN_TOTO_JSON_PAYLOAD_TYPE,
                signatures=[intoto.Signature(sig=base64.b64encode(sig), keyid="")],
            )
            bundle = sign_ec_key.bundle_pb.Bundle(
                media_type=sigstore_pb._BUNDLE_MEDIA_TYPE,
                verification_material=self._get_verification_material(),
                dsse_envelope=envelope,
            )
            return sigstore_pb.Signature(bundle)

    return Ed25519Signer(private_key, password)


def ed25519_verifier(public_key: pathlib.Path) -> Any:
    """A ``model_signing`` verifier of :func:`ed25519_signer`'s signatures."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    sign_ec_key, sigstore_pb, _, _ = _internals()

    class Ed25519Verifier(sign_ec_key.Verifier):  # type: ignore[name-defined]
        def __init__(self, path: pathlib.Path) -> None:
            key = serialization.load_pem_public_key(path.read_bytes())
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SecurityError(f"{path} is not an Ed25519 public key")
            self._ed_pub = key

        def _verify_bundle(self, bundle: Any) -> tuple[str, bytes]:
            pem = self._ed_pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            hint = bundle.verification_material.public_key.hint
            if hint != hashlib.sha256(pem).digest().hex():
                raise ValueError("Key mismatch: the signature names another public key")
            envelope = bundle.dsse_envelope
            # InvalidSignature propagates: verify_model turns it into a SecurityError.
            self._ed_pub.verify(envelope.signatures[0].sig, sigstore_pb.pae(envelope.payload))
            return envelope.payload_type, envelope.payload

    return Ed25519Verifier(public_key)
