"""``kiln monitor`` commands end to end through the CLI (tiny model, temp folders)."""

from __future__ import annotations

from pathlib import Path

from monitor_helpers import code_texts, save_tiny_gpt2
from typer.testing import CliRunner

from modelkiln.cli import app

runner = CliRunner()


def test_tests_export_and_rules(tmp_path: Path) -> None:
    r = runner.invoke(app, ["monitor", "tests"])
    assert r.exit_code == 0 and "mmd" in r.output and "psi" in r.output
    r = runner.invoke(app, ["monitor", "export", str(tmp_path / "mon"), "--target", "h:1"])
    assert r.exit_code == 0 and (tmp_path / "mon" / "kiln-alerts.yml").is_file()
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - {name: d, kind: drift, test: kss}\n")
    r = runner.invoke(app, ["monitor", "check-rules", str(bad)])
    assert r.exit_code == 2 and "unknown drift test 'kss'" in r.output


def test_profile_command_and_its_errors(tmp_path: Path) -> None:
    model = save_tiny_gpt2(tmp_path / "tiny")
    data = tmp_path / "heldout"
    data.mkdir()
    for i, t in enumerate(code_texts(30)):
        (data / f"f{i}.py").write_text(t)
    r = runner.invoke(app, ["monitor", "profile", str(model), "--data", str(data),
                            "--max-samples", "20", "--gen-tokens", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "input_tokens" in r.output and (model / "monitor_profile" / "profile.json").is_file()
    r = runner.invoke(app, ["monitor", "profile", str(model), "--data", str(tmp_path / "no")])
    assert r.exit_code == 2 and "does not exist" in r.output
