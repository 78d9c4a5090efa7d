"""Atomic stage writes, manifests and verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkiln.artifacts import (
    MANIFEST,
    clean_stale,
    hash_tree,
    load_artifact,
    sha256_file,
    stage_writer,
)
from modelkiln.errors import ArtifactError


def _write(run: Path, stage: str = "data", text: str = "hello", key: str = "k1") -> None:
    with stage_writer(run, stage, config={"a": 1}, cache_key=key) as out:
        (out.path / "sub").mkdir()
        (out.path / "sub" / "x.txt").write_text(text)
        out.metrics["files"] = 1


def test_manifest_records_everything(tmp_path: Path) -> None:
    _write(tmp_path)
    art = load_artifact(tmp_path / "data")
    m = art.manifest
    assert m.stage == "data"
    assert m.config == {"a": 1}
    assert m.cache_key == "k1"
    assert m.metrics == {"files": 1}
    assert m.outputs == {"sub/x.txt": sha256_file(tmp_path / "data" / "sub" / "x.txt")}
    assert {"modelkiln", "torch"} <= set(m.versions)
    assert m.started <= m.finished
    raw = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert set(raw) >= {
        "stage",
        "config",
        "inputs",
        "outputs",
        "metrics",
        "versions",
        "started",
        "finished",
    }


def test_inputs_are_recorded_with_hashes(tmp_path: Path) -> None:
    _write(tmp_path)
    data = load_artifact(tmp_path / "data")
    with stage_writer(tmp_path, "tokenizer", inputs={"data": data}) as out:
        (out.path / "t.json").write_text("{}")
    tok = load_artifact(tmp_path / "tokenizer")
    assert tok.manifest.inputs["data"].sha256 == data.sha256
    assert tok.manifest.inputs["data"].path == str(tmp_path / "data")


def test_failure_leaves_nothing_and_keeps_the_old_artifact(tmp_path: Path) -> None:
    _write(tmp_path, text="v1")
    with pytest.raises(RuntimeError), stage_writer(tmp_path, "data") as out:
        (out.path / "partial.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert (tmp_path / "data" / "sub" / "x.txt").read_text() == "v1"


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    _write(tmp_path, text="v1")
    _write(tmp_path, text="v2", key="k2")
    art = load_artifact(tmp_path / "data")
    assert art.manifest.cache_key == "k2"
    assert (art.path / "sub" / "x.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_unfinished_directory_is_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("half")
    with pytest.raises(ArtifactError, match="not a finished artifact"):
        load_artifact(tmp_path / "data")


def test_changed_or_missing_output_is_caught(tmp_path: Path) -> None:
    _write(tmp_path)
    f = tmp_path / "data" / "sub" / "x.txt"
    f.write_text("tampered")
    with pytest.raises(ArtifactError, match="'sub/x.txt' is changed"):
        load_artifact(tmp_path / "data")
    assert load_artifact(tmp_path / "data", verify=False).metrics == {"files": 1}
    f.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        load_artifact(tmp_path / "data")


def test_corrupt_manifest(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "data" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(tmp_path / "data")


def test_clean_stale_removes_leftovers_only(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / ".tmp-data-abc").mkdir()
    (tmp_path / ".old-data-abc").mkdir()
    removed = clean_stale(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_hash_tree_is_sorted_and_skips_manifest(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("b")
    (tmp_path / "a").write_text("a")
    (tmp_path / MANIFEST).write_text("{}")
    assert list(hash_tree(tmp_path)) == ["a", "b"]
