"""``kiln registry``: the commands end to end on a temporary registry."""

from __future__ import annotations

import json
from pathlib import Path

from rollout_helpers import make_model_dir
from typer.testing import CliRunner

from modelkiln.cli import app


def test_registry_commands(tmp_path: Path) -> None:
    run = CliRunner().invoke
    reg = ["--registry", str(tmp_path / "reg")]
    for i in (1, 2):
        src = make_model_dir(tmp_path / f"s{i}", str(i))
        assert run(app, ["registry", "add", "tiny", str(src), *reg]).exit_code == 0
    assert run(app, ["registry", "promote", "tiny@1", "--to", "production", *reg]).exit_code == 0
    assert run(app, ["registry", "promote", "tiny@2", "--to", "production", *reg]).exit_code == 0
    out = run(app, ["registry", "list", "tiny", "--json", *reg])
    assert [v["stage"] for v in json.loads(out.stdout)] == ["previous", "production"]
    res = run(app, ["registry", "rollback", "tiny", *reg])
    assert res.exit_code == 0 and "tiny@1 is in production again" in res.stdout
    shown = run(app, ["registry", "show", "tiny", "--verify", *reg])
    assert shown.exit_code == 0 and "verified" in shown.stdout
    bad = run(app, ["registry", "promote", "tiny@9", "--to", "production", *reg])
    assert bad.exit_code == 2 and "no version '9'" in bad.stderr
    assert run(app, ["registry", "archive", "tiny@2", *reg]).exit_code == 0
    out = run(app, ["registry", "list", "--json", *reg])
    assert [v["stage"] for v in json.loads(out.stdout)] == ["production", "archived"]
