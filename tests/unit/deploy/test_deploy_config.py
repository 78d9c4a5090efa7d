"""DeployConfig: one clear ConfigError naming the field for each bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.deploy.config import GPU_TYPES, load_deploy_config
from modelkiln.errors import ConfigError


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model_path": "does/not/exist"}, "model_path"),
        ({}, "model_path"),
        ({"replicas_min": 5, "replicas_max": 3}, "replicas_min"),
        ({"gpu": "nvidia-v9000"}, "gpu"),
        ({"resources": {"memory_limit": "4 gigs"}}, "resources.memory_limit"),
        ({"resources": {"cpu_request": "2cores"}}, "resources.cpu_request"),
        ({"model": "hf://x"}, "model"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_input_names_the_field(model_dir: Path, fields: dict, named: str) -> None:
    base = (
        {}
        if "model" in fields or not fields or "model_path" in fields
        else {"model_path": model_dir}
    )
    with pytest.raises(ConfigError) as info:
        load_deploy_config({**base, **fields})
    message = str(info.value)
    assert named in message
    assert "fix:" in message
    assert message.count("deploy config") == 1


def test_defaults_follow_the_handbook(model_dir: Path) -> None:
    cfg = load_deploy_config(model_path=model_dir)
    assert (cfg.replicas_min, cfg.replicas_max) == (2, 10)
    assert (cfg.cpu_target_percent, cfg.memory_target_percent) == (70, 80)
    assert cfg.model_name == "model"
    assert cfg.grace_period_s >= cfg.prestop_sleep_s + cfg.drain_timeout_s
    assert cfg.serve_args()[:2] == ["--model-path", "/models/model"]


def test_yaml_file_overrides_and_flags(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(f"model_path: {model_dir}\nreplicas_max: 4\nresources:\n  cpu_limit: 500m\n")
    cfg = load_deploy_config(path, ["replicas_min=3"], replicas_max=6)
    assert (cfg.replicas_min, cfg.replicas_max, cfg.resources.cpu_limit) == (3, 6, "500m")


@pytest.mark.parametrize("quantity", ["500m", "2", "1.5", "512Mi", "4Gi", "1e3", ".5"])
def test_valid_quantities(model_dir: Path, quantity: str) -> None:
    cfg = load_deploy_config(model_path=model_dir, resources={"cpu_limit": quantity})
    assert cfg.resources.cpu_limit == quantity


def test_gpu_types_have_a_node_label_and_an_azure_sku() -> None:
    assert all(set(v) == {"product", "azure_sku"} for v in GPU_TYPES.values())
