"""kiln keys / audit / sign / verify / encrypt through the typer app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.security.keys import KeyStore

runner = CliRunner()


def test_keys_create_list_revoke_rotate_with_audit(tmp_path: Path) -> None:
    store, audit = tmp_path / "keys.json", tmp_path / "audit.jsonl"
    args = ["--store", str(store), "--audit-log", str(audit)]
    res = runner.invoke(
        app,
        [
            "keys",
            "create",
            "--scope",
            "embed",
            "--models",
            "a,b",
            "--rpm",
            "5",
            "--tpm",
            "100",
            "--expires",
            "30d",
            "--json",
            *args,
        ],
    )
    assert res.exit_code == 0, res.output
    created = json.loads(res.stdout)
    assert created["key"] not in store.read_text()
    assert KeyStore(store).authenticate(created["key"]).models == ("a", "b")
    listed = runner.invoke(app, ["keys", "list", "--store", str(store), "--json"])
    assert json.loads(listed.stdout)[0]["id"] == created["id"]
    assert "hash" not in listed.stdout
    rotated = runner.invoke(app, ["keys", "rotate", created["id"], "--json", *args])
    assert rotated.exit_code == 0, rotated.output
    assert json.loads(rotated.stdout)["revoked"] == created["id"]
    assert runner.invoke(app, ["keys", "revoke", "nope", *args]).exit_code == 2
    verified = runner.invoke(app, ["audit", "verify", str(audit), "--json"])
    report = json.loads(verified.stdout)
    assert verified.exit_code == 0 and report["ok"] and report["lines"] == 2


def test_audit_verify_exits_1_and_names_the_line(tmp_path: Path) -> None:
    from modelkiln.security.audit import AuditLog

    log = AuditLog(tmp_path / "a.jsonl")
    for i in range(3):
        log.write("request", status=200 + i)
    log.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("201", "200")
    (tmp_path / "a.jsonl").write_text("".join(lines))
    res = runner.invoke(app, ["audit", "verify", str(tmp_path / "a.jsonl")])
    assert res.exit_code == 1 and "line 2: edited" in res.output


def test_keys_jwt_mints_a_verifiable_token() -> None:
    import jwt

    secret = "s" * 40
    res = runner.invoke(
        app, ["keys", "jwt", "--sub", "ana", "--secret", secret, "--expires", "1h", "--aud", "kiln"]
    )
    assert res.exit_code == 0, res.output
    claims = jwt.decode(res.stdout.strip(), secret, algorithms=["HS256"], audience="kiln")
    assert claims["sub"] == "ana" and claims["exp"] - claims["iat"] == 3600
    short = runner.invoke(app, ["keys", "jwt", "--sub", "a", "--secret", "short"])
    assert short.exit_code == 2 and "32 characters" in short.output


def test_sign_verify_encrypt_commands(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    key = tmp_path / "signer.pem"
    assert runner.invoke(app, ["keys", "signing-key", str(key)]).exit_code == 0
    assert runner.invoke(app, ["sign", str(model), "--key", str(key)]).exit_code == 0
    ok = runner.invoke(app, ["verify", str(model), "--key", f"{key}.pub"])
    assert ok.exit_code == 0 and "verified" in ok.output
    (model / "model.safetensors").write_bytes(b"\x01" * 64)
    bad = runner.invoke(app, ["verify", str(model), "--key", f"{key}.pub"])
    assert bad.exit_code == 2 and "model.safetensors" in bad.output
    enc = runner.invoke(app, ["encrypt", str(model), "--generate-key", str(tmp_path / "m.key")])
    assert enc.exit_code == 0, enc.output
    assert (model / "model.safetensors.enc").exists()


def test_ed25519_signing_key_command(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    key = tmp_path / "ed.pem"
    made = runner.invoke(app, ["keys", "signing-key", str(key), "--type", "ed25519"])
    assert made.exit_code == 0, made.output
    assert runner.invoke(app, ["sign", str(model), "--key", str(key)]).exit_code == 0
    ok = runner.invoke(app, ["verify", str(model), "--key", f"{key}.pub"])
    assert ok.exit_code == 0 and "verified" in ok.output
    bad = runner.invoke(app, ["keys", "signing-key", str(tmp_path / "x.pem"), "--type", "rsa"])
    assert bad.exit_code == 2 and "unknown key type 'rsa'" in bad.output
