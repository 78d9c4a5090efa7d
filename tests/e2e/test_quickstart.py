"""The quickstart end to end on a small slice of the real stdlib corpus, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkiln.artifacts import load_artifact
from modelkiln.cli import app
from modelkiln.data import load_corpus
from modelkiln.data.tokenizer import load_tokenizer

runner = CliRunner()
TINY = ["--set", "data.max_files=40", "--set", "tokenizer.vocab_size=400"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["quickstart", "--runs-dir", str(runs), *TINY])
    assert result.exit_code == 0, result.output
    return runs


def test_quickstart_builds_existing_stages_and_says_which_are_missing(runs: Path) -> None:
    run = runs / "quickstart"
    for stage in ("data", "tokenizer"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
        assert manifest["outputs"], "outputs are recorded with their sha256"
    for stage in ("train", "optimize", "serve"):
        assert not (run / stage).exists()
    report = (run / "report.md").read_text()
    assert "| train | unavailable |" in report
    assert "## Data" in report and "## Tokenizer" in report


def test_tokenizer_round_trips_every_corpus_file(runs: Path) -> None:
    run = runs / "quickstart"
    tok = load_tokenizer(run / "tokenizer")
    corpus = load_corpus(run / "data")
    checked = 0
    for split in corpus.values():
        for text in split["text"]:
            assert tok.decode(tok.encode(text)) == text
            checked += 1
    assert checked == 40
    assert load_artifact(run / "tokenizer").metrics["roundtrip_failures"] == 0


def test_second_quickstart_is_all_cached(runs: Path) -> None:
    result = runner.invoke(app, ["quickstart", "--runs-dir", str(runs), *TINY])
    assert result.exit_code == 0, result.output
    assert result.output.count("cached") >= 2
    assert "│ ran" not in result.output


def test_data_commands_share_the_cache(runs: Path) -> None:
    args = ["--runs-dir", str(runs), "--run", "quickstart", *TINY]
    assert "cached" in runner.invoke(app, ["data", "build", *args]).output
    out = runner.invoke(app, ["data", "tokenizer", *args]).output
    assert out.count("cached") >= 2


def test_doctor_quick_json() -> None:
    result = runner.invoke(app, ["doctor", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["python"]["version"].startswith("3.")
