"""The kiln serve flags of the security plug-in: parsing, TLS options, errors, pickle default."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import pytest

from modelkiln.errors import ConfigError, SecurityError
from modelkiln.security.extension import SecurityExtension
from modelkiln.security.serving import BearerAuthenticator


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    SecurityExtension().add_arguments(parser)
    return parser.parse_args(list(argv))


def test_no_flag_still_refuses_pickle_weights(tmp_path: Path) -> None:
    hooks = SecurityExtension().hooks(_parse(), cfg=None)
    assert hooks is not None and hooks.authenticator is None
    (tmp_path / "training_args.bin").write_bytes(b"not loaded by the server")
    hooks.model_checks[0](tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(SecurityError, match="refusing pickle"):
        hooks.model_checks[0](tmp_path)


def test_flags_build_authenticator_audit_and_mtls(tmp_path: Path) -> None:
    args = _parse(
        "--key-store",
        str(tmp_path / "k.json"),
        "--jwt-secret",
        "x" * 32,
        "--audit-log",
        str(tmp_path / "a.jsonl"),
        "--ssl-certfile",
        "c.pem",
        "--ssl-keyfile",
        "k.pem",
        "--ssl-ca-certs",
        "ca.pem",
    )
    hooks = SecurityExtension().hooks(args, cfg=None)
    assert hooks is not None and isinstance(hooks.authenticator, BearerAuthenticator)
    assert len(hooks.guards) == 1 and len(hooks.observers) == 1
    assert hooks.uvicorn_options == {
        "ssl_certfile": "c.pem",
        "ssl_keyfile": "k.pem",
        "ssl_ca_certs": "ca.pem",
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ssl-certfile", "c.pem"], "both --ssl-certfile and --ssl-keyfile"),
        (["--ssl-ca-certs", "ca.pem"], "needs --ssl-certfile"),
        (["--jwt-secret", "short"], "jwt"),
        (["--decrypt-key-file", "missing.key"], "cannot read key file"),
    ],
)
def test_bad_flags_are_config_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecurityExtension().hooks(_parse(*argv), cfg=None)


def test_allow_pickle_scans_and_audits(tmp_path: Path) -> None:
    import torch

    from modelkiln.security.audit import AuditLog
    from modelkiln.security.serving import model_check

    model = tmp_path / "model"
    model.mkdir()
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    audit = AuditLog(tmp_path / "audit.jsonl", fsync_interval_s=0)
    with pytest.raises(SecurityError, match="refusing pickle"):
        model_check(model, None, False, audit)
    model_check(model, None, True, audit)
    audit.close()
    events = [
        line.split('"event":"')[1].split('"')[0] for line in (tmp_path / "audit.jsonl").open()
    ]
    assert events == ["model.refused", "model.pickle_allowed", "model.accepted"]


def test_audit_has_no_prompts_unless_asked(tmp_path: Path) -> None:
    import json

    from modelkiln.contract.serving import RequestRecord
    from modelkiln.security.audit import AuditLog
    from modelkiln.security.ratelimit import MemoryLimiter
    from modelkiln.security.serving import PolicyGuard, UsageObserver

    record = RequestRecord(
        route="/v1/completions",
        method="POST",
        status=200,
        latency_s=0.1,
        time=0.0,
        model="lm",
        input_tokens=3,
        prompt_ids=([5, 6, 7],),
    )
    for asked in (False, True):
        audit = AuditLog(tmp_path / f"a{asked}.jsonl")
        UsageObserver(PolicyGuard(MemoryLimiter()), audit, True, asked).observe(record)
        audit.close()
        line = json.loads((tmp_path / f"a{asked}.jsonl").read_text())
        assert line.get("prompt_ids") == ([[5, 6, 7]] if asked else None)
