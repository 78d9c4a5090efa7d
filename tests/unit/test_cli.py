"""The CLI is thin, fast to start, and turns user errors into one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkiln import __version__
from modelkiln.cli import app
from modelkiln.errors import ConfigError

runner = CliRunner()


def test_help_lists_commands_and_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("doctor", "data", "pipeline", "quickstart"):
        assert word in result.stdout
    for stage in ("data", "tokenizer", "train", "optimize", "serve"):
        assert f"  {stage} " in result.stdout


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from modelkiln.cli import main\n"
        "sys.argv = ['kiln', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "mods = ('torch', 'transformers', 'datasets', 'tokenizers')\n"
        "heavy = [m for m in mods if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_console_script_runs() -> None:
    kiln = Path(sys.executable).parent / "kiln"
    out = subprocess.run([str(kiln), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"modelkiln {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["pipeline", "run", "--help"],
        ["data", "build", "--help"],
        ["data", "tokenizer", "--help"],
        ["quickstart", "--help"],
        ["doctor", "--help"],
        ["serve", "--help"],
        ["train", "--help"],
        ["train", "merge", "--help"],
    ],
)
def test_every_command_has_help_with_an_example(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "Example: kiln " in result.stdout


def test_config_error_is_one_line_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tokenizer:\n  vocab_size: 10\n")
    result = runner.invoke(app, ["pipeline", "run", str(cfg)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "tokenizer.vocab_size = 10" in lines[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "pipeline", "run", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


def test_bad_set_and_stage_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: x\n")
    result = runner.invoke(app, ["pipeline", "run", str(cfg), "--set", "oops"])
    assert result.exit_code == 2 and "bad override 'oops'" in result.stderr
    result = runner.invoke(app, ["pipeline", "run", str(cfg), "--stages", "data,trian"])
    assert result.exit_code == 2 and "unknown stage 'trian'" in result.stderr


def test_serve_without_a_model_is_a_clear_error() -> None:
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "pass --model-path DIR" in result.stderr


def test_error_text_with_brackets_is_printed_verbatim(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: x\n")
    result = runner.invoke(app, ["pipeline", "run", str(cfg), "--set", "data.source=[bold]x"])
    assert result.exit_code == 2
    assert "[bold]x" in result.stderr
