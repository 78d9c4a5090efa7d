"""``kiln serve --model registry://NAME@production`` resolves to a verified registry folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from rollout_helpers import make_model_dir

from modelkiln.errors import ArtifactError
from modelkiln.rollout.registry import Registry
from modelkiln.serve.__main__ import build_parser, config_from_args


def test_serve_model_from_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELKILN_REGISTRY", str(tmp_path / "reg"))
    reg = Registry()
    for i in (1, 2):
        reg.add("tiny", make_model_dir(tmp_path / f"s{i}", str(i)))
    reg.promote("tiny", 2, "production")
    args = build_parser().parse_args(["--model", "registry://tiny@production"])
    [spec] = config_from_args(args).models
    assert (spec.served_name, spec.version, spec.path) == (
        "tiny",
        "2",
        Path(reg.show("tiny", 2).path),
    )
    args = build_parser().parse_args(["--model-path", "registry://tiny@1", "--name", "old"])
    assert config_from_args(args).models[0].served_name == "old"
    f = Path(reg.show("tiny", 1).path) / "config.json"
    f.chmod(0o644)
    f.write_text("{}")
    with pytest.raises(ArtifactError, match="changed after registration"):
        config_from_args(build_parser().parse_args(["--model", "registry://tiny@1"]))
