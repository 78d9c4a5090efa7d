"""Reference profiles: computed on a tiny model, JSON + .npy, refused when they do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monitor_helpers import code_texts, save_tiny_gpt2

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.monitor.profile import (
    PROFILE_DIR,
    FeatureData,
    load_profile,
    model_hash,
    write_profile,
)
from modelkiln.monitor.profiling import compute_profile, load_heldout_texts, table_features


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = save_tiny_gpt2(tmp_path_factory.mktemp("m") / "tiny")
    compute_profile(model, code_texts(40), max_samples=30, gen_tokens=4, source="unit")
    return model


def test_causal_lm_profile_has_request_and_output_features(profiled: Path) -> None:
    p = load_profile(profiled / PROFILE_DIR, model_hash=model_hash(profiled))
    assert set(p.features) == {
        "input_tokens", "byte_length", "unknown_token_share", "rare_token_share",
        "output_tokens", "mean_logprob", "mean_entropy", "finish_reason",
    }  # fmt: skip
    assert set(p.features["finish_reason"].values) <= {"stop", "length"}
    assert len(p.features["input_tokens"].values) == 30
    assert np.all(p.features["mean_logprob"].values < 0)
    assert p.meta.model_name == "tiny" and p.meta.source == "unit"
    assert len(p.extras["common_token_ids"]) > 0
    doc = json.loads((profiled / PROFILE_DIR / "profile.json").read_text())
    assert doc["features"]["input_tokens"]["stats"]["p50"] > 0
    assert not list((profiled / PROFILE_DIR).rglob("*.pkl"))


def test_profile_of_another_model_is_refused(profiled: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="another model") as e:
        load_profile(profiled / PROFILE_DIR, model_hash="0" * 64)
    assert "kiln monitor profile" in str(e.value)
    with pytest.raises(ArtifactError, match="is of model 'tiny', not 'other'"):
        load_profile(profiled / PROFILE_DIR, model_name="other")


def _small_profile(tmp_path: Path) -> Path:
    feats = {"x": FeatureData("num", "table", np.arange(50.0))}
    return write_profile(tmp_path / "p", feats, model_name="m", model_hash="h")


def test_truncated_array_is_refused_naming_the_fix(tmp_path: Path) -> None:
    out = _small_profile(tmp_path)
    arr = out / "arrays" / "x.npy"
    arr.write_bytes(arr.read_bytes()[:60])
    with pytest.raises(ArtifactError, match="truncated or was edited") as e:
        load_profile(out)
    assert e.value.hint is not None and "kiln monitor profile" in e.value.hint


def test_truncated_json_is_refused(tmp_path: Path) -> None:
    out = _small_profile(tmp_path)
    j = out / "profile.json"
    j.write_text(j.read_text()[:40])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_profile(out)
    with pytest.raises(ArtifactError, match="no reference profile"):
        load_profile(tmp_path / "nowhere")


def test_model_hash_ignores_the_profile_folder(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"abc")
    before = model_hash(tmp_path)
    (tmp_path / PROFILE_DIR).mkdir()
    (tmp_path / PROFILE_DIR / "profile.json").write_text("{}")
    assert model_hash(tmp_path) == before
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert model_hash(tmp_path) != before


def test_tabular_columns_and_defaults(tmp_path: Path) -> None:
    feats = table_features({"age": np.arange(2000), "city": ["a", "b"] * 1000})
    out = write_profile(tmp_path / "t", feats, model_name="m", model_hash="h")
    p = load_profile(out)
    assert p.meta.features["age"].test == "wasserstein"
    assert p.meta.features["city"].test == "jensenshannon"
    assert p.meta.features["city"].stats["categories"] == {"a": 1000, "b": 1000}


def test_heldout_texts_from_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("   \n")
    assert load_heldout_texts(tmp_path) == ["x = 1\n"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "hello"}\n{"prompt": "p"}\n')
    assert load_heldout_texts(j) == ["hello", "p"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_heldout_texts(tmp_path / "missing")
