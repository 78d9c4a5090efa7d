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
_SMALL = {
    "data.max_files": "40",
    "tokenizer.vocab_size": "400",
    "train.model.size": "tiny",
    "train.data.domain_modules": "[]",
    "train.data.block_size": "64",
    "train.data.max_eval_tokens": "1024",
    "train.pretrain.max_steps": "4",
    "train.pretrain.batch_size": "2",
    "train.pretrain.eval_steps": "2",
    "train.pretrain.save_steps": "2",
    "train.finetune.max_steps": "2",
    "train.finetune.batch_size": "2",
    "train.finetune.eval_steps": "2",
    "train.finetune.save_steps": "2",
    "optimize.bench.batch_sizes": "[1,2]",
    "optimize.bench.seq_lengths": "[32]",
    "optimize.bench.max_seconds": "1",
    "optimize.bench.min_runs": "1",
    "optimize.bench.max_runs": "2",
    "optimize.data.eval_texts": "4",
    "optimize.data.max_length": "32",
    "optimize.data.train_batches": "2",
    "optimize.data.train_batch_size": "2",
    "optimize.data.train_seq_len": "32",
    "optimize.prune.schedule_steps": "1",
    "optimize.prune.recovery_steps": "2",
    "serve.requests": "4",
    "serve.concurrency": "2",
    "serve.max_tokens": "4",
    "monitor.profile_samples": "80",
    "monitor.requests": "50",
    "monitor.window": "40",
    "monitor.chunk_lines": "4",
}
TINY = [arg for key, value in _SMALL.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["quickstart", "--runs-dir", str(runs), *TINY])
    assert result.exit_code == 0, result.output
    return runs


def test_quickstart_builds_every_stage(runs: Path) -> None:
    run = runs / "quickstart"
    for stage in ("data", "tokenizer", "train", "optimize", "serve", "monitor"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
        assert manifest["outputs"], "outputs are recorded with their sha256"
    report = (run / "report.md").read_text()
    assert "| train | ran |" in report and "| optimize | ran |" in report
    assert "| serve | ran |" in report and "| monitor | ran |" in report
    for section in ("## Data", "## Tokenizer", "## Train", "## Optimize", "## Serv", "## Monitor"):
        assert section in report


def test_serve_stage_served_the_model_and_stopped_cleanly(runs: Path) -> None:
    serve = load_artifact(runs / "quickstart" / "serve")
    assert serve.metrics["errors"] == 0
    assert serve.metrics["closed"]["output_tokens_per_s"] > 0


def test_monitor_stage_sees_no_drift_then_drift_and_delivers_an_alert(runs: Path) -> None:
    mon = load_artifact(runs / "quickstart" / "monitor")
    assert mon.metrics["held_out"]["errors"] == 0 and mon.metrics["prose"]["errors"] == 0
    assert mon.metrics["held_out"]["drift_detected"] is False, mon.metrics["held_out"]
    assert mon.metrics["prose"]["drift_detected"] is True
    assert mon.metrics["prose"]["drifted_features"], "the drifted features are named"
    assert mon.metrics["alerts_received"] >= 1, "the webhook receiver got the drift alert"
    body = json.loads((mon.path / "monitor.json").read_text())["alerts_received"][0]
    assert body["status"] == "firing" and body["model"] == "model"
    for phase in ("held_out", "prose"):
        assert (mon.path / phase / "report.png").stat().st_size > 0
    report = (runs / "quickstart" / "report.md").read_text()
    assert "## Monitor" in report and "(monitor/prose/report.png)" in report


def test_optimize_stage_compares_variants_of_the_fine_tuned_model(runs: Path) -> None:
    opt = load_artifact(runs / "quickstart" / "optimize")
    variants = opt.metrics["variants"]
    assert set(variants) == {
        "torch-fp32", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "prune-structured"
    }  # fmt: skip
    assert variants["torch-fp32"]["status"] in {"baseline", "chosen"}
    assert variants["torch-fp32"]["quality"] > 1.0, "held-out perplexity was measured"
    assert abs(variants["onnx-fp32"]["quality_ratio"] - 1.0) < 1e-3
    assert (opt.path / "source" / "merge.json").is_file(), "the LoRA adapter was merged first"
    report = (runs / "quickstart" / "report.md").read_text()
    assert "| variant | status | size MB |" in report and "| `onnx-int8-dynamic` |" in report


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
    assert result.output.count("cached") >= 3
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


def test_train_merge_writes_a_plain_transformers_model(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = runner.invoke(app, ["train", "merge", str(runs / "quickstart" / "train"), str(out)])
    assert result.exit_code == 0, result.output
    assert "max |logit diff|" in result.stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.num_parameters() > 0
