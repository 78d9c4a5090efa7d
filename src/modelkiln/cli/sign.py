"""``kiln sign`` / ``kiln verify`` (OpenSSF model signing) and ``kiln encrypt`` (AES-GCM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelkiln.cli._common import console, guard


def sign(
    path: Annotated[Path, typer.Argument(help="Model / variant / adapter directory or file.")],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="PEM private key: EC P-256/384/521 or Ed25519 (kiln keys signing-key)."
        ),
    ],
    password: Annotated[
        str | None,
        typer.Option(
            "--password", envvar="MODELKILN_SIGNING_PASSWORD", help="Password of an encrypted key."
        ),
    ] = None,
) -> None:
    """Sign a run artifact, optimize variant, registry version or PEFT adapter (OMS format).

    The signature goes to DIR/model.sig (FILE.sig for a file). Keyless Sigstore signing
    needs the network: use model_signing's own CLI for it.

    Example: kiln sign runs/quickstart/train/model --key ~/.kiln/signer.pem
    """
    from modelkiln.security.signing import sign_model

    with guard():
        sig = sign_model(path, key, password)
    console.print(f"signed {path} -> {sig}")


def verify(
    path: Annotated[Path, typer.Argument(help="Signed directory or file.")],
    key: Annotated[Path, typer.Option("--key", help="The signer's PEM public key.")],
) -> None:
    """Verify a signature; exit 2 naming every changed, added or removed file.

    Example: kiln verify runs/quickstart/train/model --key ~/.kiln/signer.pem.pub
    """
    from modelkiln.security.signing import verify_model

    with guard():
        verify_model(path, key)
    console.print(f"[green]verified[/green] {path}")


def encrypt(
    path: Annotated[Path | None, typer.Argument(help="Model directory or weight file.")] = None,
    key_file: Annotated[
        Path | None, typer.Option("--key-file", help="256-bit key file, kept away from PATH.")
    ] = None,
    generate_key: Annotated[
        Path | None, typer.Option("--generate-key", help="Write a new key file here first.")
    ] = None,
    remove_plaintext: Annotated[
        bool, typer.Option("--remove-plaintext", help="Delete the plaintext weight files.")
    ] = False,
) -> None:
    """Encrypt weight files (safetensors, ONNX) with AES-256-GCM into FILE.enc.

    The server decrypts them in memory (kiln serve --decrypt-key-file K).

    Example: kiln encrypt runs/x/train/model --generate-key /secure/model.key --remove-plaintext
    """
    from modelkiln.errors import ConfigError
    from modelkiln.security.encryption import encrypt_path, generate_key_file

    with guard():
        if generate_key is not None:
            key_file = generate_key_file(generate_key)
            console.print(f"key: {key_file} (mode 0600; keep it away from the model)")
        if path is None:
            return
        if key_file is None:
            raise ConfigError("no key", hint="pass --key-file K or --generate-key K")
        written = encrypt_path(path, key_file, remove_plaintext)
    for f in written:
        console.print(f"encrypted {f}")


def register(app: typer.Typer) -> None:
    """Add ``sign``, ``verify`` and ``encrypt`` to the root app."""
    app.command("sign")(sign)
    app.command("verify")(verify)
    app.command("encrypt")(encrypt)
