"""The optimize stage writes a reference profile next to its promoted model (pipeline wiring).

The optimize package's own stage function is replaced by one that promotes a tiny
GPT-2 (the real one is tested in tests/unit/optimize); everything else is real: the
stage registry entry, the pipeline engine's manifest, the data stage's held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from monitor_helpers import CODE, save_tiny_gpt2

from modelkiln.artifacts import Artifact, load_artifact, sha256_file
from modelkiln.config import DataConfig, PipelineConfig
from modelkiln.contract import MODEL_DIR, VARIANT_JSON, write_variant_json
from modelkiln.monitor.profile import load_profile, model_hash
from modelkiln.pipeline import run_pipeline, run_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real data-stage artifact over a small source tree (its test split is held out)."""
    root = tmp_path_factory.mktemp("optprof")
    for i in range(12):
        pkg = root / "src" / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "mod.py").write_text("".join(CODE[j % len(CODE)] for j in range(i, i + 12)))
    data = DataConfig(source=str(root / "src"), validation_fraction=0.2, test_fraction=0.4,
                      humaneval=False)  # fmt: skip
    cfg = PipelineConfig.model_validate(
        {"run": "d", "runs_dir": str(root / "runs"), "stages": ["data"], "data": data}
    )
    artifact = run_pipeline(cfg, report=None).outcome("data").artifact
    assert artifact is not None
    return artifact


def fake_optimize(backend: str) -> Any:
    def run(ctx: Any) -> None:
        model = save_tiny_gpt2(ctx.out / MODEL_DIR)
        write_variant_json(model, {"variant": f"{backend}-fp32", "backend": backend,
                                   "task": "causal-lm", "dir": str(ctx.out)})  # fmt: skip
        ctx.metrics["chosen"] = f"{backend}-fp32"

    return run


def pipeline(tmp: Path, data: Any, **monitor: Any) -> PipelineConfig:
    section = {"chunk_lines": 1, "profile_samples": 20, "max_tokens": 2} | monitor
    stages = ["data", "train", "optimize"]
    return PipelineConfig.model_validate(
        {"run": "o", "runs_dir": str(tmp), "stages": stages, "monitor": section}
    )


def optimized(cfg: PipelineConfig, data: Any) -> Artifact:
    """The optimize stage run by the pipeline engine (the data artifact stands in for train)."""
    artifact = run_stage(cfg, "optimize", {"data": data, "train": data}).artifact
    assert artifact is not None
    return artifact


def test_promoted_model_gets_a_profile_covered_by_the_manifest(
    tmp_path: Path, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelkiln.optimize.stage.run_optimize_stage", fake_optimize("torch"))
    cfg = pipeline(tmp_path, data)
    artifact = load_artifact(optimized(cfg, data).path)  # verifies every hash of the manifest
    model = artifact.path / MODEL_DIR
    profile = load_profile(model / "monitor_profile", model_hash=model_hash(model))
    assert {"input_tokens", "rare_token_share", "mean_logprob", "output_tokens"} <= set(
        profile.features
    )
    assert len(profile.features["input_tokens"].values) == 20
    meta = json.loads((model / "monitor_profile" / "profile.json").read_text())
    assert meta["source"] == "data stage test split"
    outputs = artifact.manifest.outputs
    for rel in (
        "model/monitor_profile/profile.json",
        "model/monitor_profile/arrays/input_tokens.npy",
    ):
        assert outputs[rel] == sha256_file(artifact.path / rel)
    recorded = artifact.manifest.metrics["monitor_profile"]
    assert recorded["path"] == "model/monitor_profile" and "mean_logprob" in recorded["features"]


def test_onnx_variants_get_request_features_and_the_switch_turns_it_off(
    tmp_path: Path, data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelkiln.optimize.stage.run_optimize_stage", fake_optimize("onnxruntime"))
    model = optimized(pipeline(tmp_path / "a", data), data).path / MODEL_DIR
    assert (model / VARIANT_JSON).is_file()
    features = set(load_profile(model / "monitor_profile").features)
    assert "input_tokens" in features and "mean_logprob" not in features  # no torch logits

    few = pipeline(tmp_path / "c", data, chunk_lines=500)  # too little held-out data
    out = optimized(few, data)
    assert "at least 20" in out.manifest.metrics["monitor_profile"]["error"]
    assert (out.path / MODEL_DIR / VARIANT_JSON).is_file()  # the promotion stands

    off = pipeline(tmp_path / "b", data, profile_promoted=False)
    out = optimized(off, data)
    assert not (out.path / MODEL_DIR / "monitor_profile").exists()
    assert "monitor_profile" not in out.manifest.metrics
