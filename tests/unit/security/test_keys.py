"""Key store: hashed storage, constant-time check, revoke / rotate / expiry, re-read on change."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from modelkiln.errors import ConfigError, SecurityError
from modelkiln.security.keys import KeyStore, parse_duration


def test_create_stores_only_an_hmac_and_authenticates(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, record = store.create(scope="embed", models=["mini"], rpm=5, tpm=100)
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and key.split("_", 2)[2] not in text  # the secret may hold "_"
    assert record.hash in text and len(record.hash) == 64
    assert oct(os.stat(tmp_path / "keys.json.secret").st_mode & 0o777) == "0o600"
    principal = KeyStore(tmp_path / "keys.json").authenticate(key)  # a fresh reader
    assert principal.key_id == f"key:{record.id}"
    assert principal.scopes == {"embed"} and principal.models == ("mini",)
    assert (principal.rpm, principal.tpm) == (5, 100)


def test_wrong_unknown_and_malformed_keys_are_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, _record = store.create()
    with pytest.raises(SecurityError, match="invalid API key"):
        store.authenticate(key[:-4] + "AAAA")
    with pytest.raises(SecurityError, match="invalid API key"):
        store.authenticate(f"mk_{'0' * 12}_{'a' * 43}")
    with pytest.raises(SecurityError, match="malformed"):
        store.authenticate("hello")


def test_another_secret_does_not_accept_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, _ = store.create()
    monkeypatch.setenv("MODELKILN_KEY_SECRET", "ab" * 32)
    with pytest.raises(SecurityError, match="invalid"):
        KeyStore(tmp_path / "keys.json").authenticate(key)


def test_revoke_is_seen_by_a_running_reader_without_restart(tmp_path: Path) -> None:
    server_view = KeyStore(tmp_path / "keys.json")
    cli_view = KeyStore(tmp_path / "keys.json")
    key, record = cli_view.create(scope="infer")
    assert server_view.authenticate(key).subject == f"key:{record.id}"
    cli_view.revoke(record.id)
    with pytest.raises(SecurityError, match="revoked"):
        server_view.authenticate(key)
    assert [r.revoked for r in server_view.list()] == [True]


def test_rotate_keeps_the_policy_and_retires_the_old_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    old_key, old = store.create(scope="admin", models=["a", "b"], rpm=7, expires_in_s=3600)
    new_key, new = store.rotate(old.id)
    assert new.id != old.id and (new.scope, new.models, new.rpm) == ("admin", ["a", "b"], 7)
    assert new.expires is not None and abs(new.expires - old.expires) < 5  # type: ignore[operator]
    assert store.authenticate(new_key).scopes == {"infer", "embed", "admin"}
    with pytest.raises(SecurityError, match="revoked"):
        store.authenticate(old_key)


def test_expired_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, _record = store.create(expires_in_s=3600)
    data = json.loads((tmp_path / "keys.json").read_text())
    data["keys"][0]["expires"] = time.time() - 1
    (tmp_path / "keys.json").write_text(json.dumps(data))
    with pytest.raises(SecurityError, match="expired"):
        store.authenticate(key)


def test_bad_scope_unknown_id_and_durations(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    with pytest.raises(ConfigError, match="scope"):
        store.create(scope="root")
    with pytest.raises(ConfigError, match="no key with id"):
        store.revoke("ffffffffffff")
    assert parse_duration("30d") == 30 * 86400 and parse_duration("90s") == 90
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("soon")


def test_allowlist_accepts_adapters_of_allowed_models(tmp_path: Path) -> None:
    key, _ = (store := KeyStore(tmp_path / "k.json")).create(models=["lm"])
    p = store.authenticate(key)
    assert p.allows_model("lm") and p.allows_model("lm:sql") and p.allows_model(None)
    assert not p.allows_model("other")
