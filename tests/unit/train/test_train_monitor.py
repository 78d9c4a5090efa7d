"""Training monitor: monitor.jsonl rows, plots, report section, sampler thread lifecycle,
report_to checks, MonitoredTrainer token counting and step progress of the train stage."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import train_helpers as h  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.progress import Progress  # noqa: E402
from modelkiln.train import monitor as mon  # noqa: E402
from modelkiln.train.config import MonitorConfig  # noqa: E402
from modelkiln.train.stage import MONITOR_DIR, train_into  # noqa: E402

STEP_FIELDS = {"phase", "kind", "step", "time", "step_time_s", "tokens", "tokens_per_s", "lr",
               "loss", "grad_norm", "eval_loss", "rss_mb", "cpu_percent"}  # fmt: skip
SYSTEM_FIELDS = {"phase", "kind", "time", "elapsed_s", "cpu_percent", "rss_mb", "ram_percent"}


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kiln-monitor"]


class RecordingProgress(Progress):
    """Keeps every progress call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float | None]] = []

    def start(self, task: str, total: float | None = None) -> None:
        self.calls.append(("start", task, total))

    def advance(self, task: str, amount: float = 1.0) -> None:
        self.calls.append(("advance", task, amount))

    def finish(self, task: str) -> None:
        self.calls.append(("finish", task, None))


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny pretrain (4 steps) + LoRA finetune (6 steps) run through the train stage."""
    data, tok = h.shared_inputs()
    root = tmp_path_factory.mktemp("monitored")
    loop = {"max_steps": 4, "eval_steps": 2, "save_steps": 2}
    cfg = h.tiny_config(
        pretrain={"enabled": True, **loop},
        finetune={"max_steps": 6, "eval_steps": 3, "save_steps": 3, "logging_steps": 2},
        monitor={"sample_interval_s": 0.05},
    )
    progress = RecordingProgress()
    out = root / "out"
    out.mkdir()
    result = train_into(cfg, out, data=data, tokenizer=tok, run_dir=root, seed=0,
                        progress=progress)  # fmt: skip
    rows = mon.read_monitor(out / MONITOR_DIR / mon.MONITOR_FILE)
    return {"out": out, "rows": rows, "progress": progress, "result": result}


def test_steps_are_monotonic_per_phase_with_all_fields(staged: dict[str, Any]) -> None:
    rows = staged["rows"]
    for phase, n in (("pretrain", 4), ("finetune", 6)):
        steps = [r for r in rows if r["phase"] == phase and r["kind"] == "step"]
        assert [r["step"] for r in steps] == list(range(1, n + 1))
        for r in steps:
            assert set(r) == STEP_FIELDS
            assert r["step_time_s"] > 0 and r["tokens"] == 4 * 32  # batch 4 x block 32
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=0.01)
            assert r["lr"] == pytest.approx(1e-2)  # constant schedule
        times = [r["time"] for r in steps]
        assert times == sorted(times)
    finetune = [r for r in rows if r["phase"] == "finetune" and r["kind"] == "step"]
    logged = [r["step"] for r in finetune if r["loss"] is not None]
    assert logged == [2, 4, 6]  # logging_steps = 2
    assert all(r["grad_norm"] > 0 for r in finetune if r["loss"] is not None)
    assert [r["step"] for r in finetune if r["eval_loss"] is not None] == [3, 6]


def test_system_samples_have_cpu_and_memory(staged: dict[str, Any]) -> None:
    system = [r for r in staged["rows"] if r["kind"] == "system"]
    assert {r["phase"] for r in system} == {"pretrain", "finetune"}
    assert len(system) >= 4  # first + last sample of each phase at least
    for r in system:
        assert set(r) >= SYSTEM_FIELDS
        assert r["rss_mb"] > 50 and 0 <= r["ram_percent"] <= 100 and r["cpu_percent"] >= 0


def test_plots_and_report_section(staged: dict[str, Any]) -> None:
    out = staged["out"]
    for phase in ("pretrain", "finetune"):
        png = out / MONITOR_DIR / f"monitor_{phase}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert report.startswith("## Train") and "### Training monitor" in report
    assert "| pretrain | 4 |" in report and "| finetune | 6 |" in report
    assert "(monitor/monitor_finetune.png)" in report


def test_sampler_thread_is_stopped(staged: dict[str, Any]) -> None:
    assert _sampler_threads() == []


def test_stage_shows_step_progress(staged: dict[str, Any]) -> None:
    calls = staged["progress"].calls
    assert ("start", "pretrain", 4) in calls and ("start", "finetune", 6) in calls
    assert sum(1 for c in calls if c[:2] == ("advance", "finetune")) == 6
    assert ("finish", "finetune", None) in calls


def test_monitor_can_be_disabled(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config(finetune={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
                        monitor={"enabled": False})  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    train_into(cfg, out, data=data, tokenizer=tok, run_dir=tmp_path, seed=0)
    assert not (out / MONITOR_DIR).exists()
    assert "Training monitor" not in (out / "report.md").read_text()


def test_resource_sampler_samples_and_joins(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = []
    with mon.ResourceSampler(0.01, rows.append) as sampler:
        assert sampler.running and len(_sampler_threads()) == 1
        time.sleep(0.1)
    assert not sampler.running and _sampler_threads() == []
    assert len(rows) >= 3 and all(r["kind"] == "system" for r in rows)
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)


def test_check_report_to() -> None:
    assert mon.check_report_to([]) == [] and mon.check_report_to(["none"]) == []
    assert mon.check_report_to(["all"]) == ["all"]
    with pytest.raises(ConfigError, match="tensorbord") as err:
        mon.check_report_to(["tensorbord"])
    assert "tensorboard" in str(err.value)  # the hint lists the names


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_missing_integration_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pip install wandb"):
        mon.check_report_to(["wandb"])
    data, tok = h.shared_inputs()
    cfg = h.tiny_config(report_to=["wandb"])
    with pytest.raises(ConfigError, match="wandb"):  # before any training
        train_into(cfg, tmp_path / "o", data=data, tokenizer=tok, run_dir=tmp_path, seed=0)
    assert not (tmp_path / "checkpoints").exists()


def test_monitored_trainer_counts_real_tokens(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    )  # fmt: skip
    lengths = [5, 9, 16, 3, 12, 7, 16, 10]  # two padded batches of 4 x 16 positions
    rows = []
    for n in lengths:
        ids = torch.randint(1, 64, (16,))
        mask = (torch.arange(16) < n).long()
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = mon.MonitoredTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        monitor=mon.TrainingMonitor(tmp_path / "m", MonitorConfig(sample_interval_s=0.05)),
    )
    trainer.train()
    steps = [r for r in mon.read_monitor(tmp_path / "m" / mon.MONITOR_FILE) if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["tokens"] < 4 * 16 for r in steps)  # padding not counted
    assert sum(r["tokens"] for r in steps) == sum(lengths)
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in steps)
    assert (tmp_path / "m" / "monitor_train.png").is_file()
    assert _sampler_threads() == []
