"""The contract's variant loader on every format ``kiln optimize`` writes, and ``kiln bench
offline`` / ``kiln profile`` on each of them.

The variants are built here with the optimize library (tiny BERT and GPT-2, a
few seconds each); the contract loader must give the same outputs as the optimize
stage's own loader, without importing it (tests/unit/test_architecture.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optimize"))
import opt_helpers as h

from modelkiln.bench.offline import OfflineConfig, run_offline
from modelkiln.bench.profiling import profile_model
from modelkiln.contract.variants import FORMATS, load_variant, variant_format
from modelkiln.errors import ArtifactError, ConfigError

#: (model, optimize variant) -> the format it is written in.
BUILDS = {
    ("bert", "torch-fp32"): "hf",
    ("bert", "torch-bf16"): "hf",
    ("bert", "torch-int8-dynamic"): "hf-torchao",
    ("gpt2", "torch-int8-dynamic"): "torchao-linear",
    ("bert", "prune-structured"): "hf",
    ("bert", "distill-layers"): "hf",
    ("bert", "torchscript"): "torchscript",
    ("gpt2", "torch-export"): "torch-export",
    ("bert", "onnx-fp32"): "onnx",
    ("gpt2", "onnx-int8-dynamic"): "onnx",
}


def _build(name: str, model_dir: Path, out: Path) -> Path:
    import torch

    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import load_torch_model, synthetic_batch

    torch.manual_seed(0)
    spec = h.spec_of(model_dir)
    samples = [synthetic_batch(spec, 2, 12, seed=5, pad_last=True)]
    train = [synthetic_batch(spec, 4, 16, seed=10 + i) for i in range(2)]
    cfg = h.fast_config(prune={"recovery_steps": 0, "criterion": "l1", "schedule_steps": 1},
                        distill={"steps": 2})  # fmt: skip
    ctx = BuildContext(spec, load_torch_model(spec), cfg, samples, train)
    return build_variant(name, ctx, out, samples).path


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("variants")
    models = {"bert": h.make_bert(root / "bert"), "gpt2": h.make_gpt2(root / "gpt2")}
    return {(m, v): _build(v, models[m], root / f"{m}-{v}") for m, v in BUILDS}


def _optimize_output(path: Path, batch: dict[str, Any]) -> np.ndarray:
    """The optimize stage's own loader (what kiln optimize measured) on the same batch."""
    import torch

    from modelkiln.optimize.quantize import load_variant as optimize_load

    runner = optimize_load(path)
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    return runner(**tensors).main.numpy()


@pytest.mark.parametrize(("model", "variant"), list(BUILDS))
def test_loader_reads_each_format_like_the_optimize_stage(
    model: str, variant: str, variants: dict[tuple[str, str], Path]
) -> None:
    path = variants[(model, variant)]
    fmt = BUILDS[(model, variant)]
    loaded = load_variant(path, device="cpu", threads=1)
    assert variant_format(path) == fmt and loaded.format == fmt
    assert loaded.variant == variant and loaded.backend == FORMATS[fmt]
    if variant == "torch-bf16":
        assert loaded.dtype == "bfloat16"  # not silently up-cast to fp32
    feed = loaded.make_inputs(2, 10)
    got = loaded.main_output(feed)
    assert got.shape[:2] == (2, 10) and np.isfinite(got).all()
    np.testing.assert_allclose(got, _optimize_output(path, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("model", "variant"), list(BUILDS))
def test_bench_offline_times_every_variant(
    model: str, variant: str, variants: dict[tuple[str, str], Path]
) -> None:
    cfg = OfflineConfig(model=str(variants[(model, variant)]), batches=[1, 2], seqs=[8],
                        warmup=1, min_runs=2, max_runs=3, budget_s=5, threads=1)  # fmt: skip
    result = run_offline(cfg)
    fmt = BUILDS[(model, variant)]
    assert [r["backend"] for r in result["rows"]] == [FORMATS[fmt]] * 2
    assert all(r["runs"] >= 2 and r["items_per_s"] > 0 for r in result["rows"])
    assert result["variants"][0]["variant"] == variant
    assert result["variants"][0]["format"] == fmt


def test_profile_a_torchscript_and_a_bf16_variant(
    variants: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    res = profile_model(variants[("bert", "torchscript")], tmp_path / "ts", batch=2, seq=8, steps=1)
    names = {e.get("name", "") for e in json.loads(Path(res["trace"]).read_text())["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the program's ops are in the trace
    assert res["variant"]["format"] == "torchscript"
    assert "does not train" in res["memory"]["skipped"]
    res = profile_model(variants[("bert", "torch-bf16")], tmp_path / "bf", batch=2, seq=8, steps=1)
    mem = res["memory"]
    assert res["variant"]["dtype"] == "bfloat16"
    assert mem["adam_state_mb"] == pytest.approx(2 * mem["params_mb"])  # moments in bf16 too


def test_unknown_format_and_missing_backend_are_clear_errors(
    variants: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no weights for backend 'onnx'"):
        load_variant(variants[("bert", "torchscript")], backend="onnx")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "variant.json").write_text(json.dumps({"variant": "x", "format": "gguf"}))
    with pytest.raises(ArtifactError, match="format 'gguf', which no loader knows"):
        load_variant(odd)


def test_several_variants_in_one_interleaved_sweep(
    variants: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from modelkiln.cli import app

    dirs = [str(variants[("bert", v)]) for v in ("torch-fp32", "onnx-fp32", "torchscript")]
    out = tmp_path / "side"
    res = CliRunner().invoke(app, ["bench", "offline", *dirs, "--batches", "1,2", "--seqs", "8",
                                   "--warmup", "1", "--min-runs", "2", "--max-runs", "3",
                                   "--budget", "5", "--threads", "1", "-o", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((out / "offline.json").read_text())
    names = ["torch-fp32:torch", "onnx-fp32:onnx", "torchscript:torch"]
    assert [r["backend"] for r in data["rows"]] == [n for n in names for _ in (1, 2)]
    assert {o["backend"] for o in data["optimal"]} == set(names)
    assert "torchscript" in (out / "report.html").read_text()


def test_a_missing_runtime_is_named(
    variants: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from modelkiln.errors import DependencyMissingError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))  # fmt: skip
    with pytest.raises(DependencyMissingError, match="torchao"):
        load_variant(variants[("bert", "torch-int8-dynamic")])


def test_a_stage_directory_resolves_to_its_model(
    variants: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    import shutil

    stage = tmp_path / "optimize"  # runs/<run>/optimize: the promoted variant is in model/
    shutil.copytree(variants[("bert", "onnx-fp32")], stage / "model")
    loaded = load_variant(stage)
    assert loaded.path == stage / "model" and loaded.variant == "onnx-fp32"
    res = profile_model(stage, tmp_path / "p", batch=2, seq=8, steps=1)
    assert res["backend"] == "onnx" and res["top_ops"]
