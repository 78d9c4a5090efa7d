"""The serve pipeline stage on a tiny Llama: model choice (train / promoted / ONNX fallback),
a real server on loopback, the load test, clean drain, metrics and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from http_helpers import code_tokenizer

from modelkiln.artifacts import Artifact, Manifest
from modelkiln.config import PipelineConfig
from modelkiln.data.tokenizer import save_tokenizer
from modelkiln.errors import StageError
from modelkiln.pipeline import StageContext
from modelkiln.pipeline_serve import run_serve_stage
from modelkiln.progress import Progress
from modelkiln.serve.stage import ServeStageConfig, choose_model


class _Bars(Progress):
    """Records what a progress bar would show."""

    def __init__(self) -> None:
        self.totals: dict[str, float | None] = {}
        self.done: dict[str, float] = {}
        self.finished: list[str] = []

    def start(self, task: str, total: float | None = None) -> None:
        self.totals[task] = total

    def advance(self, task: str, amount: float = 1.0) -> None:
        self.done[task] = self.done.get(task, 0) + amount

    def finish(self, task: str) -> None:
        self.finished.append(task)


def artifact(path: Path, stage: str) -> Artifact:
    return Artifact(path, Manifest(stage=stage, config={}, cache_key="k", started="s",
                                   finished="f"))  # fmt: skip


def save_tiny_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = code_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
        eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    save_tiny_llama(root / "model")
    return root


def test_choose_model_prefers_a_runnable_variant_and_falls_back_from_onnx(
    train_dir: Path, tmp_path: Path
) -> None:
    train = artifact(train_dir, "train")
    assert choose_model({"train": train}).path == train_dir / "model"
    opt = tmp_path / "optimize"
    (opt / "model").mkdir(parents=True)
    variant = {"variant": "onnx-int8-dynamic", "backend": "onnxruntime", "task": "causal-lm"}
    (opt / "model" / "variant.json").write_text(json.dumps(variant))
    onnx = choose_model({"optimize": artifact(opt, "optimize"), "train": train})
    assert onnx.path == train_dir / "model" and "cannot run" in onnx.note
    assert onnx.backend == "torch"
    (opt / "model" / "model_kv.onnx").write_bytes(b"")  # an ONNX variant with a KV graph
    kv = choose_model({"optimize": artifact(opt, "optimize"), "train": train})
    assert kv.path == opt / "model" and kv.backend == "onnx" and "ONNX Runtime" in kv.note
    (opt / "model" / "model_kv.onnx").unlink()
    save_tiny_llama(opt / "model")
    variant |= {"variant": "torch-fp32", "backend": "torch"}
    (opt / "model" / "variant.json").write_text(json.dumps(variant))
    torch_choice = choose_model({"optimize": artifact(opt, "optimize"), "train": train})
    assert torch_choice.path == opt / "model" and torch_choice.variant == "torch-fp32"
    with pytest.raises(StageError, match="needs the 'optimize' or the 'train'"):
        choose_model({})


def test_serve_stage_serves_load_tests_drains_and_reports(train_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cfg = ServeStageConfig(requests=8, concurrency=4, max_tokens=8, rate=20.0, duration_s=30)
    ctx = StageContext(
        pipeline=PipelineConfig(run="t", runs_dir=tmp_path, seed=1),
        config=cfg,
        out=out,
        inputs={"train": artifact(train_dir, "train")},
        metrics={},
        progress=(bars := _Bars()),
    )
    run_serve_stage(ctx)
    m = ctx.metrics
    assert m["served_source"] == "train" and m["errors"] == 0
    # One bar per load run, advanced per completed request, then finished (the CLI's bars).
    assert bars.totals == {"serve: closed loop x4": 8, "serve: open loop 20 req/s": 8}
    assert bars.done == {"serve: closed loop x4": 8, "serve: open loop 20 req/s": 8}
    assert bars.finished == list(bars.totals)
    for run in ("closed", "open"):
        s = m[run]
        assert s["requests"] == 8 and s["ok"] == 8
        assert 0 < s["output_tokens"] <= 8 * 8 and s["output_tokens_per_s"] > 0
        assert s["ttft_p50_ms"] > 0 and s["ttft_p95_ms"] >= s["ttft_p50_ms"]
        assert s["goodput_rps"] <= s["throughput_rps"]
    assert m["closed"]["mode"] == "closed loop, concurrency 4"
    report = (out / "report.md").read_text()
    assert "| closed loop, concurrency 4 | 8 (8) |" in report and "Poisson 20" in report
    per_request = json.loads((out / "requests.json").read_text())
    assert len(per_request["closed"]) == 8
    assert json.loads((out / "serve.json").read_text())["server"]["port"] == 0


def test_serve_stage_serves_an_onnx_variant_in_onnx_runtime(
    train_dir: Path, tmp_path: Path
) -> None:
    from modelkiln.contract.hfmodel import inspect_model, load_torch_model
    from modelkiln.kvgraph import KV_ONNX, export_kv_onnx

    opt = tmp_path / "optimize"
    variant_dir = opt / "model"
    variant_dir.mkdir(parents=True)
    spec = inspect_model(train_dir / "model", "causal-lm")
    model = load_torch_model(spec)
    export_kv_onnx(model, spec, variant_dir / KV_ONNX)
    model.config.save_pretrained(variant_dir)
    save_tokenizer(code_tokenizer(), variant_dir)
    info = {"variant": "onnx-fp32", "backend": "onnxruntime", "task": "causal-lm"}
    (variant_dir / "variant.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        pipeline=PipelineConfig(run="t", runs_dir=tmp_path, seed=1),
        config=ServeStageConfig(requests=6, concurrency=3, max_tokens=6, duration_s=30),
        out=out,
        inputs={"optimize": artifact(opt, "optimize"), "train": artifact(train_dir, "train")},
        metrics={},
    )
    run_serve_stage(ctx)
    m = ctx.metrics
    assert m["served_backend"] == "onnx" and m["served_variant"] == "onnx-fp32"
    assert m["errors"] == 0 and m["closed"]["ok"] == 6 and m["closed"]["output_tokens"] > 0
    assert "ONNX Runtime" in (out / "report.md").read_text()
