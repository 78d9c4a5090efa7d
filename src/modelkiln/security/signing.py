"""Sign and verify model directories with OpenSSF ``model_signing`` (OMS format, local key).

A directory (run artifact, optimize variant, registry version, PEFT adapter) is
signed into ``DIR/model.sig``, which the signature itself does not cover; a
single file ``F`` into ``F.sig``. Keys are PEM keys: elliptic-curve (P-256 / P-384 /
P-521: the curves ``model_signing`` accepts for local keys) or Ed25519 (same OMS
bundle, signed through :mod:`.signing_ed25519`: ``model_signing`` 1.1 itself takes no
Ed25519 key, so its own CLI cannot verify those; ``kiln verify`` can). Keyless
Sigstore signing needs the network: ``model_signing``'s own CLI does it, and
its bundles verify with the certificate verifier; it is not tested here.

A :class:`TrustPolicy` lists the trusted public keys; :meth:`TrustPolicy.check`
refuses, with one clear error, a model whose signature is missing, invalid or
made by a key that is not trusted.

Example:
    >>> generate_signing_key("signing.pem")          # writes signing.pem + signing.pem.pub
    >>> sign_model("runs/x/train/model", "signing.pem")
    >>> verify_model("runs/x/train/model", "signing.pem.pub")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError, SecurityError

SIGNATURE_NAME = "model.sig"


def signature_path(model: str | Path) -> Path:
    """Where the signature of ``model`` lives (``DIR/model.sig`` or ``FILE.sig``)."""
    model = Path(model)
    return model / SIGNATURE_NAME if model.is_dir() else model.with_name(model.name + ".sig")


def _hashing_config():  # type: ignore[no-untyped-def]
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=True)


def generate_signing_key(path: str | Path, kind: str = "ec") -> Path:
    """Write a new private key (``kind``: ``ec`` = P-256, or ``ed25519``) to ``path`` (0600)
    and its public key to ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists", hint="pick another path or delete it first")
    if kind not in ("ec", "ed25519"):
        raise ConfigError(f"unknown key type {kind!r}", hint="use ec (P-256) or ed25519")
    key: Any = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ec"
        else (ed25519.Ed25519PrivateKey.generate())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(f"{path}.pub").write_bytes(pub)
    return Path(f"{path}.pub")


def sign_model(model: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign ``model`` (a directory or a file); return the signature's path."""
    import model_signing

    model = Path(model)
    if not model.exists():
        raise ConfigError(f"nothing to sign at {model}", hint="pass a model directory or file")
    sig = signature_path(model)
    try:
        config = model_signing.signing.Config()
        if key_type(private_key, private=True, password=password) == "ed25519":
            from modelkiln.security.signing_ed25519 import ed25519_signer

            config._signer = ed25519_signer(Path(private_key), password)  # no public setter
        else:
            config.use_elliptic_key_signer(private_key=private_key, password=password)
        config.set_hashing_config(_hashing_config()).sign(model, sig)
    except (ValueError, TypeError, OSError) as exc:
        raise SecurityError(
            f"cannot sign {model} with {private_key}: {exc}",
            hint="use a PEM EC (P-256/384/521) or Ed25519 private key (kiln keys signing-key)",
        ) from None
    return sig


def key_type(path: str | Path, *, private: bool, password: str | None = None) -> str:
    """``"ec"`` or ``"ed25519"``: the kind of a PEM key file.

    Raises:
        SecurityError: unreadable, or another kind of key (RSA, Ed448, an unsupported curve).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        data = Path(path).read_bytes()
        key: object = (
            serialization.load_pem_private_key(data, password.encode() if password else None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise SecurityError(
            f"cannot read the {'private' if private else 'public'} key {path}: {exc}",
            hint="pass a PEM key file (kiln keys signing-key writes KEY and KEY.pub)",
        ) from None
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    curve = getattr(key, "curve", None)
    if curve is not None and curve.name in ("secp256r1", "secp384r1", "secp521r1"):
        return "ec"
    kind = type(key).__name__.lstrip("_")
    raise SecurityError(
        f"{path} is a {kind} key{f' on {curve.name}' if curve else ''}: model signing takes "
        "EC keys on P-256 / P-384 / P-521 or Ed25519 keys",
        hint="make one with: kiln keys signing-key KEY [--type ed25519]",
    )


def verify_model(model: str | Path, public_key: str | Path) -> None:
    """Check that ``model`` matches its signature made by ``public_key``.

    Raises:
        SecurityError: no signature, a signature by another key, or changed / added /
            removed files (the message lists them).
    """
    import model_signing

    model = Path(model)
    sig = signature_path(model)
    if not sig.exists():
        raise SecurityError(
            f"{model} is not signed (no {sig.name})", hint=f"sign it: kiln sign {model} --key KEY"
        )
    try:
        config = model_signing.verifying.Config()
        if key_type(public_key, private=False) == "ed25519":
            from modelkiln.security.signing_ed25519 import ed25519_verifier

            config._verifier = ed25519_verifier(Path(public_key))  # no public setter
        else:
            config.use_elliptic_key_verifier(public_key=public_key)
        config.set_hashing_config(_hashing_config()).verify(model, sig)
    except SecurityError:
        raise
    except Exception as exc:  # model_signing raises ValueError and crypto errors alike
        raise SecurityError(
            f"signature check of {model} against {public_key} failed: {exc}",
            hint="re-sign the model or trust its signer's key",
        ) from None


class TrustPolicy(KilnModel):
    """Which signers the server trusts (``kiln serve --trust-policy FILE``, JSON or YAML)."""

    public_keys: list[Path] = Field(min_length=1, description="Trusted PEM public keys.")
    require_signature: bool = Field(
        True, description="Refuse unsigned models and adapters (False: only log them)."
    )

    @classmethod
    def load(cls, path: str | Path) -> TrustPolicy:
        """Read a policy file; relative key paths are relative to the file."""
        from modelkiln.configbase import read_yaml

        path = Path(path)
        data = json.loads(path.read_text()) if path.suffix == ".json" else read_yaml(path)
        policy = cls.model_validate(data)
        keys = [k if k.is_absolute() else path.parent / k for k in policy.public_keys]
        return policy.model_copy(update={"public_keys": keys})

    def check(self, model: str | Path) -> Path | None:
        """Return the trusted key that signed ``model``.

        Raises:
            SecurityError: unsigned (when required), tampered, or signed by no trusted key.
        """
        model = Path(model)
        if not signature_path(model).exists() and not self.require_signature:
            return None
        errors = []
        for key in self.public_keys:
            try:
                verify_model(model, key)
                return key
            except SecurityError as exc:
                if "is not signed" in exc.message:
                    raise
                errors.append(exc.message)
        raise SecurityError(
            f"refusing {model}: its signature is invalid or from an untrusted key "
            f"({len(self.public_keys)} trusted key(s) tried; first error: {errors[0]})",
            hint="sign it with a trusted key, or add the signer's public key to the policy",
        )
