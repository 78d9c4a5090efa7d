"""``kiln serve --model registry://NAME@production`` resolves to a verified registry folder
(through the registry's serve extension)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rollout_helpers import make_model_dir

from modelkiln.contract.serving import SERVE_EXTENSIONS
from modelkiln.errors import ArtifactError
from modelkiln.rollout.extension import RegistryExtension
from modelkiln.rollout.registry import Registry
from modelkiln.serve.__main__ import build_parser, config_from_args


def _cfg(argv: list[str]) -> object:
    ext = [RegistryExtension()]
    return config_from_args(build_parser(extensions=ext).parse_args(argv), ext)


def test_serve_model_from_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    for i in (1, 2):
        reg.add("tiny", make_model_dir(tmp_path / f"s{i}", str(i)))
    reg.promote("tiny", 2, "production")
    where = ["--registry", str(reg.root)]
    [spec] = _cfg([*where, "--model", "registry://tiny@production"]).models  # type: ignore[attr-defined]
    assert (spec.served_name, spec.version, spec.path) == (
        "tiny",
        "2",
        Path(reg.show("tiny", 2).path),
    )
    named = _cfg([*where, "--model-path", "registry://tiny@1", "--name", "old"])
    assert named.models[0].served_name == "old"  # type: ignore[attr-defined]
    f = Path(reg.show("tiny", 1).path) / "config.json"
    f.chmod(0o644)
    f.write_text("{}")
    with pytest.raises(ArtifactError, match="changed after registration"):
        _cfg([*where, "--model", "registry://tiny@1"])


def test_env_location_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKILN_REGISTRY", str(tmp_path / "reg"))
    Registry().add("m", make_model_dir(tmp_path / "s", "x"))
    assert RegistryExtension().model_spec("registry://m@1") is not None
    assert RegistryExtension().model_spec(str(tmp_path / "s")) is None


def test_extension_is_wired() -> None:
    assert "modelkiln.rollout.extension:RegistryExtension" in SERVE_EXTENSIONS
