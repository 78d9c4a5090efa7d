"""Azure ML files load with azure-ai-ml v2 (offline) and wire blue / green correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelkiln.deploy.azureml import write_azureml
from modelkiln.deploy.config import load_deploy_config
from modelkiln.errors import ConfigError

aml = pytest.importorskip("azure.ai.ml")


@pytest.mark.parametrize("gpu", [None, "nvidia-a100"])
def test_files_load_with_azure_ai_ml(model_dir: Path, tmp_path: Path, gpu: str | None) -> None:
    cfg = load_deploy_config(model_path=model_dir, gpu=gpu)
    write_azureml(cfg, tmp_path, green_percent=25)
    base = tmp_path / "azureml"
    job = aml.load_job(base / "pipeline.yml")
    assert list(job.jobs) == ["train", "evaluate", "register"]
    assert job.jobs["register"].outputs["model"].type == "custom_model"
    endpoint = aml.load_online_endpoint(base / "endpoint.yml")
    assert endpoint.traffic == {"blue": 75, "green": 25}
    for color in ("blue", "green"):
        dep = aml.load_online_deployment(base / f"deployment-{color}.yml")
        assert dep.name == color
        assert dep.endpoint_name == endpoint.name  # the handbook's selectors did not match
        assert dep.code_configuration.scoring_script == "score.py"
        assert dep.instance_type == ("Standard_NC24ads_A100_v4" if gpu else "Standard_DS3_v2")
        assert (base / "score" / "score.py").is_file()
    assert set(endpoint.traffic) == {"blue", "green"}
    conda = yaml.safe_load((base / "environment/conda.yml").read_text())
    assert cfg.package in conda["dependencies"][-1]["pip"]
    assert (base / "pipeline-config.yaml").read_text().strip()


def test_bad_traffic_share_names_the_option(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="green"):
        write_azureml(load_deploy_config(model_path=model_dir), tmp_path, green_percent=120)
