"""``kiln serve`` and ``python -m modelkiln.serve``: one parser (with the extensions' flags),
one place that turns errors into exit codes."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.contract import serving
from modelkiln.contract.serving import ServeHooks
from modelkiln.errors import ConfigError, ServingError
from modelkiln.serve import __main__ as serve_main

runner = CliRunner()


class ToyExtension:
    """Adds ``--toy-level``; refuses negative levels; plugs one observer."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--toy-level", type=int, default=0, help="toy extension level")

    def hooks(self, args: argparse.Namespace, cfg: Any) -> ServeHooks | None:
        if args.toy_level < 0:
            raise ConfigError(f"--toy-level {args.toy_level} is negative", hint="pass 0 or more")
        if not args.toy_level:
            return None
        return ServeHooks(observers=[self], uvicorn_options={"ssl_certfile": cfg.models[0].path})

    def observe(self, record: Any) -> None:
        """Unused: the server is not started here."""


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the blocking server with a recorder; register the toy extension."""
    calls: list[dict[str, Any]] = []

    def fake_serve(cfg: Any, *, log_level: str, hooks: ServeHooks) -> None:
        calls.append({"cfg": cfg, "hooks": hooks})
        if str(cfg.models[0].path) == "fails":
            raise ServingError("the server stopped: boom")
        if str(cfg.models[0].path) == "bad-config":
            raise ConfigError("threads: 0 is too small")

    monkeypatch.setattr("modelkiln.serve.server.serve", fake_serve)
    monkeypatch.setattr(serving, "SERVE_EXTENSIONS", [f"{__name__}:ToyExtension"])
    return calls


def test_kiln_serve_help_lists_the_server_and_extension_flags(served: list[Any]) -> None:
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--model-path", "--api-key", "--backend", "--toy-level"):
        assert flag in result.stdout
    assert "usage: kiln serve" in result.stdout


def test_both_commands_give_the_extension_hooks_to_the_server(served: list[Any]) -> None:
    result = runner.invoke(app, ["serve", "--model-path", "m", "--toy-level", "2"])
    assert result.exit_code == 0, result.output
    assert serve_main.main(["--model-path", "m", "--toy-level", "2"]) == 0
    for call in served:
        assert call["hooks"].uvicorn_options == {"ssl_certfile": call["cfg"].models[0].path}
        assert len(call["hooks"].observers) == 1


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        ([], 2, "pass --model-path DIR"),
        (["--model-path", "m", "--name", "a", "--name", "b"], 2, "one --name per --model-path"),
        (["--model-path", "m", "--toy-level", "-1"], 2, "--toy-level -1 is negative"),
        (["--model-path", "bad-config"], 2, "threads: 0 is too small"),
        (["--model-path", "fails"], 1, "the server stopped: boom"),
    ],
)
def test_errors_become_one_line_and_one_exit_code(
    served: list[Any], argv: list[str], code: int, text: str
) -> None:
    result = runner.invoke(app, ["serve", *argv])
    assert result.exit_code == code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]
    assert "Traceback" not in result.output


def test_debug_re_raises(served: list[Any]) -> None:
    result = runner.invoke(app, ["--debug", "serve", "--model-path", "fails"])
    assert isinstance(result.exception, ServingError)


def test_an_extension_that_does_not_resolve_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serving, "SERVE_EXTENSIONS", ["modelkiln.nowhere:Ext"])
    assert serve_main.main(["--model-path", "m"]) == 2
    assert "cannot load the server extension 'modelkiln.nowhere:Ext'" in capsys.readouterr().err
