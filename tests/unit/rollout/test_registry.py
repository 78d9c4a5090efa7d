"""The model registry: add / list / show / promote / archive / rollback, verification, locking."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rollout_helpers import make_model_dir

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.rollout import resolve_model_uri
from modelkiln.rollout.registry import Registry, default_registry_dir


def _snapshot(reg: Registry) -> tuple[object, ...]:
    names = {v.name for v in reg.list_versions()}
    return tuple(v.model_dump() for v in reg.list_versions()), tuple(
        tuple(map(str, reg.events(n))) for n in sorted(names)
    )


def test_add_copies_hashes_and_carries(registry: Registry, tmp_path: Path) -> None:
    src = make_model_dir(tmp_path / "onnx", "x", kind="onnx")
    v = registry.add("tiny", src)
    assert (v.version, v.kind, v.stage) == (1, "onnx", "none")
    assert v.carries == {"eval_card": "eval_card.json"}
    assert v.files == 3 and v.size_bytes > 0
    hashes = registry.hashes("tiny", 1)
    assert set(hashes) == {"model.onnx", "eval_card.json", "tokenizer/tokenizer.json"}
    # immutable: a copy, read-only, independent of the source
    (src / "model.onnx").write_bytes(b"changed")
    assert registry.resolve("tiny", 1) == Path(v.path)
    assert not os.stat(Path(v.path) / "model.onnx").st_mode & stat.S_IWUSR


@pytest.mark.parametrize("kind", ["hf", "onnx", "peft"])
def test_kinds(registry: Registry, tmp_path: Path, kind: str) -> None:
    assert registry.add("m", make_model_dir(tmp_path / kind, kind=kind)).kind == kind


def test_not_a_model_dir_is_refused(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a model folder"):
        registry.add("m", tmp_path / "junk")
    assert registry.list_versions() == []
    assert not list(registry.root.glob(".incoming/*"))


def test_tampered_version_is_refused_at_load(registry: Registry, model_dir: Path) -> None:
    v = registry.add("tiny", model_dir)
    f = Path(v.path) / "model.safetensors"
    f.chmod(0o644)
    f.write_bytes(b"evil")
    with pytest.raises(ArtifactError, match="'model.safetensors' was changed after registration"):
        resolve_model_uri("registry://tiny@1", registry.root)
    (Path(v.path) / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="was missing"):
        registry.resolve("tiny", 1)


def test_added_file_is_refused(registry: Registry, model_dir: Path) -> None:
    v = registry.add("tiny", model_dir)
    (Path(v.path) / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="'extra.bin' was added"):
        registry.resolve("tiny", 1)


def test_hard_link_edit_of_source_is_caught(registry: Registry, model_dir: Path) -> None:
    registry.add("tiny", model_dir, link=True)
    (model_dir / "config.json").write_text("{}")  # same inode as the registry's file
    with pytest.raises(ArtifactError, match="config.json"):
        registry.resolve("tiny", 1)


def test_promote_resolve_and_rollback(registry: Registry, tmp_path: Path) -> None:
    for i in range(3):
        registry.add("tiny", make_model_dir(tmp_path / f"s{i}", str(i)))
    registry.promote("tiny", 1, "production")
    registry.promote("tiny", 2, "staging")
    assert resolve_model_uri("registry://tiny@staging", registry.root).name == "2"
    registry.promote("tiny", 3, "production")
    assert resolve_model_uri("registry://tiny@production", registry.root).name == "3"
    assert resolve_model_uri("registry://tiny", registry.root).name == "3"
    assert registry.show("tiny", 1).stage == "previous"
    back = registry.rollback("tiny")
    assert back.version == 1 and back.stage == "production"
    assert registry.show("tiny", 3).stage == "rolled-back"
    with pytest.raises(ArtifactError, match="no earlier production version"):
        registry.rollback("tiny")


def test_keep_last_n_production_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=2)
    for i in range(1, 4):
        reg.add("m", make_model_dir(tmp_path / f"s{i}", str(i)))
        reg.promote("m", i, "production")
    assert [v.stage for v in reg.list_versions("m")] == ["archived", "previous", "production"]
    assert not Path(reg.show("m", 1).path).exists()
    with pytest.raises(ArtifactError, match="archived"):
        reg.resolve("m", 1)
    assert reg.rollback("m").version == 2


def test_bad_inputs_leave_registry_unchanged(registry: Registry, model_dir: Path) -> None:
    registry.add("tiny", model_dir)
    registry.promote("tiny", 1, "production")
    before = _snapshot(registry)
    with pytest.raises(ArtifactError, match="no version '7' of model 'tiny'"):
        registry.promote("tiny", 7, "production")
    with pytest.raises(ArtifactError, match="no such model"):
        registry.resolve("ghost", "production")
    with pytest.raises(ConfigError, match="bad stage"):
        registry.promote("tiny", 1, "prod")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="in production"):
        registry.archive("tiny", 1)
    with pytest.raises(ConfigError, match="invalid model name"):
        registry.add("../evil", model_dir)
    with pytest.raises(ConfigError, match="bad model reference"):
        resolve_model_uri("registry://tiny@", registry.root)
    assert _snapshot(registry) == before


def test_tampered_version_cannot_be_promoted(registry: Registry, model_dir: Path) -> None:
    v = registry.add("tiny", model_dir)
    f = Path(v.path) / "config.json"
    f.chmod(0o644)
    f.write_text("{}")
    before = _snapshot(registry)
    with pytest.raises(ArtifactError, match="changed"):
        registry.promote("tiny", 1, "production")
    assert _snapshot(registry) == before


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELKILN_REGISTRY", str(tmp_path / "r"))
    assert default_registry_dir() == tmp_path / "r"
    monkeypatch.delenv("MODELKILN_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_registry_dir() == tmp_path / "xdg" / "modelkiln" / "registry"


_ADD = """
import sys
from modelkiln.rollout.registry import Registry
reg = Registry(sys.argv[1], keep=20)
for _ in range(3):
    v = reg.add("m", sys.argv[2])
    reg.promote("m", v.version, "production")
"""


def test_concurrent_processes_are_safe(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    Registry(root, keep=20)
    srcs = [make_model_dir(tmp_path / f"p{i}", str(i)) for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", _ADD, str(root), str(s)]) for s in srcs]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    reg = Registry(root, keep=20)
    versions = reg.list_versions("m")
    assert [v.version for v in versions] == list(range(1, 13))
    assert sum(v.stage == "production" for v in versions) == 1
    for v in versions:
        reg.resolve("m", v.version)  # every version's files match its own hashes
