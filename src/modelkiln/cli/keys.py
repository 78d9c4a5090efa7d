"""``kiln keys``: scoped API keys (create, list, revoke, rotate), JWT minting, signing keys."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from modelkiln.cli._common import console, guard

keys_app = typer.Typer(
    name="keys",
    help="Scoped API keys with per-key rate and token limits, JWTs and signing keys.\n\n"
    "Example: kiln keys create --scope infer --models lm --rpm 60 --tpm 20000 --expires 30d",
    no_args_is_help=True,
    rich_markup_mode=None,
)

StoreOpt = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="MODELKILN_KEY_STORE",
        help="Key store JSON file (its HMAC secret lives in FILE.secret).",
    ),
]
AuditOpt = Annotated[
    Path | None,
    typer.Option(
        "--audit-log",
        envvar="MODELKILN_AUDIT_LOG",
        help="Append the key change to this hash-chained audit log (the server's "
        "--audit-log file may be shared: appends are locked).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _audit(path: Path | None, event: str, **fields: object) -> None:
    if path is None:
        return
    from modelkiln.contract.audit import AuditLog

    log = AuditLog(path, fsync_interval_s=0)
    log.write(event, actor="cli", **fields)
    log.close()


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@keys_app.command("create")
def create(
    scope: Annotated[
        str, typer.Option("--scope", help="infer (completions, chat), embed, or admin (all).")
    ] = "infer",
    models: Annotated[
        str | None, typer.Option("--models", help="Comma-separated allowed models (default all).")
    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    tpm: Annotated[
        int | None, typer.Option("--tpm", min=1, help="Tokens per minute (prompt + completion).")
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime: 30d, 12h, 15m (default never).")
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Owner or purpose.")] = "",
    store: StoreOpt = Path("keys.json"),
    audit_log: AuditOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once (only its HMAC is stored).

    Example: kiln keys create --scope embed --models minilm --rpm 600 --expires 30d --json
    """
    from modelkiln.security.keys import KeyStore, parse_duration

    with guard():
        lifetime = parse_duration(expires) if expires else None
        key, rec = KeyStore(store).create(scope, _split(models), rpm, tpm, lifetime, note)
        _audit(audit_log, "key.create", key_id=rec.id, scope=rec.scope, models=rec.models,
               rpm=rec.rpm, tpm=rec.tpm, expires=rec.expires)  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps({"id": rec.id, "key": key}) + "\n")
        return
    console.print(f"id:  {rec.id}\nkey: {key}", highlight=False)
    console.print("[dim]the key is shown only now; the store keeps its HMAC[/dim]")


@keys_app.command("list")
def list_keys(store: StoreOpt = Path("keys.json"), as_json: JsonOpt = False) -> None:
    """List the keys' ids and policies (never the keys).

    Example: kiln keys list --store keys.json
    """
    from modelkiln.security.keys import KeyStore

    with guard():
        records = KeyStore(store).list()
    if as_json:
        rows = [r.model_dump(exclude={"hash"}) for r in records]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"keys in {store}", title_justify="left")
    for col in ("id", "scope", "models", "rpm", "tpm", "expires", "state", "note"):
        table.add_column(col)
    now = time.time()
    for r in records:
        state = "revoked" if r.revoked else "expired" if r.expires and r.expires < now else "active"
        exp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.expires)) if r.expires else "never"
        table.add_row(
            r.id,
            r.scope,
            escape(",".join(r.models) or "*"),
            str(r.rpm or "-"),
            str(r.tpm or "-"),
            exp,
            state,
            escape(r.note),
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (kiln keys list).")],
    store: StoreOpt = Path("keys.json"),
    audit_log: AuditOpt = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request.

    Example: kiln keys revoke 3f2a9c01b7de
    """
    from modelkiln.security.keys import KeyStore

    with guard():
        KeyStore(store).revoke(key_id)
        _audit(audit_log, "key.revoke", key_id=key_id)
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (kiln keys list).")],
    store: StoreOpt = Path("keys.json"),
    audit_log: AuditOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace a key: a new key with the same policy; the old one is revoked.

    Example: kiln keys rotate 3f2a9c01b7de --json
    """
    from modelkiln.security.keys import KeyStore

    with guard():
        key, rec = KeyStore(store).rotate(key_id)
        _audit(audit_log, "key.rotate", key_id=key_id, new_key_id=rec.id)
    if as_json:
        sys.stdout.write(json.dumps({"id": rec.id, "key": key, "revoked": key_id}) + "\n")
        return
    console.print(f"id:  {rec.id}\nkey: {key}\nrevoked {key_id}", highlight=False)


@keys_app.command("jwt")
def mint_jwt(
    sub: Annotated[str, typer.Option("--sub", help="Subject (user id).")],
    secret: Annotated[
        str,
        typer.Option(
            "--secret", envvar="MODELKILN_JWT_SECRET", help="HS256 shared secret (32+ chars)."
        ),
    ],
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 30d, 12h.")] = "30d",
    scope: Annotated[str, typer.Option("--scope", help="Space-separated scopes.")] = "infer embed",
    models: Annotated[str | None, typer.Option("--models", help="Allowed models.")] = None,
    audience: Annotated[str | None, typer.Option("--aud", help="Audience claim.")] = None,
    issuer: Annotated[str | None, typer.Option("--iss", help="Issuer claim.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute.")] = None,
) -> None:
    """Mint an HS256 JWT (the handbook's generate_api_key, with scopes and limits).

    Example: MODELKILN_JWT_SECRET=... kiln keys jwt --sub ana --expires 30d --aud kiln
    """
    from modelkiln.security.jwt_auth import mint_hs256
    from modelkiln.security.keys import parse_duration

    with guard():
        token = mint_hs256(
            secret,
            sub=sub,
            expires_in_s=parse_duration(expires),
            audience=audience,
            issuer=issuer,
            scopes=scope.split(),
            models=_split(models) or None,
            rpm=rpm,
            tpm=tpm,
        )
    sys.stdout.write(token + "\n")


@keys_app.command("signing-key")
def signing_key(
    out: Annotated[Path, typer.Argument(help="Private key path (public key: OUT.pub).")],
    kind: Annotated[
        str,
        typer.Option(
            "--type",
            help="ec (P-256, verifiable by model_signing's own CLI too) or ed25519 (kiln "
            "verify only: model_signing 1.1 takes EC keys only).",
        ),
    ] = "ec",
) -> None:
    """Generate a signing key pair for kiln sign / kiln verify.

    Example: kiln keys signing-key ~/.kiln/signer.pem --type ed25519
    """
    from modelkiln.security.signing import generate_signing_key

    with guard():
        pub = generate_signing_key(out, kind)
    console.print(f"private key: {out} (mode 0600)\npublic key:  {pub}")


def register(app: typer.Typer) -> None:
    """Add ``keys`` to the root app."""
    app.add_typer(keys_app, name="keys")
