"""``kiln deploy azureml``: an Azure ML v2 pipeline job, a managed online endpoint with
blue / green deployments, their environment and the scoring script.

The pipeline runs modelkiln's own stages: train (data, tokenizer, train), evaluate
(optimize: every variant is measured against the quality gate and one is promoted)
and register (the promoted model becomes a registered ``custom_model`` output). The
scoring script (:mod:`modelkiln.deploy.azureml_score`, copied as ``score/score.py``)
runs the same server engine as ``kiln serve``. Files load with ``azure-ai-ml``'s
``load_job`` / ``load_online_endpoint`` / ``load_online_deployment`` (tests check).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from modelkiln.deploy._yaml import dump, write
from modelkiln.deploy.config import GPU_TYPES, DeployConfig
from modelkiln.errors import ConfigError

_SCHEMA = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"
#: Azure ML curated base image (conda inside); modelkiln comes from conda.yml's pip list.
BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
CPU_SKU = "Standard_DS3_v2"
ENV_NAME = "modelkiln-serve"


def _env_ref(cfg: DeployConfig) -> dict[str, Any]:
    return {"image": BASE_IMAGE, "conda_file": "environment/conda.yml"}


def conda(cfg: DeployConfig) -> dict[str, Any]:
    """conda.yml of the environment: Python plus modelkiln from pip."""
    return {
        "name": ENV_NAME,
        "channels": ["conda-forge"],
        "dependencies": [
            f"python={cfg.python_version}",
            "pip",
            {"pip": [cfg.package, "azureml-inference-server-http"]},
        ],
    }


def environment(cfg: DeployConfig) -> dict[str, Any]:
    """environment.yml (``az ml environment create -f``)."""
    return {"$schema": _SCHEMA.format("environment"), "name": ENV_NAME, **_env_ref(cfg)}


def _step(cfg: DeployConfig, name: str, command: str, **io: Any) -> dict[str, Any]:
    return {
        "type": "command",
        "display_name": name,
        "command": command,
        "environment": _env_ref(cfg),
        **io,
    }


def _out(job: str, name: str) -> str:
    return "${{parent.jobs." + job + ".outputs." + name + "}}"


def pipeline(cfg: DeployConfig) -> dict[str, Any]:
    """pipeline.yml: train -> evaluate (optimize + quality gate) -> register."""
    run = "kiln pipeline run ${{inputs.config}} --run azure --runs-dir ${{outputs.runs}}"
    train = _step(
        cfg, "train", run + " --stages data,tokenizer,train",
        inputs={"config": "${{parent.inputs.config}}"}, outputs={"runs": {"type": "uri_folder"}},
    )  # fmt: skip
    evaluate = _step(
        cfg, "evaluate",
        "cp -r ${{inputs.runs}}/. ${{outputs.runs}} && " + run + " --stages optimize",
        inputs={"config": "${{parent.inputs.config}}", "runs": _out("train", "runs")},
        outputs={"runs": {"type": "uri_folder"}},
    )  # fmt: skip
    register = _step(
        cfg, "register", "cp -r ${{inputs.runs}}/azure/optimize/model/. ${{outputs.model}}",
        inputs={"runs": _out("evaluate", "runs")},
        outputs={"model": {"type": "custom_model", "name": cfg.model_name}},
    )  # fmt: skip
    return {
        "$schema": _SCHEMA.format("pipelineJob"),
        "type": "pipeline",
        "display_name": f"{cfg.name}-train-evaluate-register",
        "experiment_name": cfg.name,
        "settings": {"default_compute": "azureml:cpu-cluster", "continue_on_step_failure": False},
        "inputs": {"config": {"type": "uri_file", "path": "pipeline-config.yaml"}},
        "jobs": {"train": train, "evaluate": evaluate, "register": register},
    }


def endpoint(cfg: DeployConfig, green_percent: int) -> dict[str, Any]:
    """endpoint.yml: key auth, traffic split between the two deployments."""
    return {
        "$schema": _SCHEMA.format("managedOnlineEndpoint"),
        "name": cfg.name,
        "auth_mode": "key",
        "traffic": {"blue": 100 - green_percent, "green": green_percent},
    }


def deployment(cfg: DeployConfig, color: str, model: str) -> dict[str, Any]:
    """deployment-<color>.yml; ``endpoint_name`` is the endpoint's own name (the handbook's
    blue / green listing pointed at an endpoint that no longer existed)."""
    sku = GPU_TYPES[cfg.gpu]["azure_sku"] if cfg.gpu else CPU_SKU
    return {
        "$schema": _SCHEMA.format("managedOnlineDeployment"),
        "name": color,
        "endpoint_name": cfg.name,
        "model": model,
        "code_configuration": {"code": "score", "scoring_script": "score.py"},
        "environment": _env_ref(cfg),
        "environment_variables": {"MODELKILN_MODEL_SUBDIR": "", "HF_HUB_OFFLINE": "1"},
        "instance_type": sku,
        "instance_count": cfg.replicas_min,
        "request_settings": {
            "request_timeout_ms": 90_000,
            "max_concurrent_requests_per_instance": cfg.ongoing_requests_target,
        },
        "liveness_probe": {"initial_delay": 30, "period": 10},
        "readiness_probe": {"initial_delay": 10, "period": 5},
    }


def _models(cfg: DeployConfig) -> tuple[str, str]:
    """(blue, green) model references: the registered versions 1 and 2, or a local path."""
    if cfg.model_path is not None:
        local = "azureml:" + cfg.model_name
        return f"{local}:1", f"{local}:2"
    name = str(cfg.model).removeprefix("registry://")
    base, _, version = name.partition("@")
    return f"azureml:{base}:{version or 1}", f"azureml:{base}:{int(version or 1) + 1}"


def write_azureml(
    cfg: DeployConfig,
    out: str | Path,
    green_percent: int = 10,
    pipeline_config: str | Path | None = None,
) -> list[Path]:
    """Write ``out/azureml/``: pipeline.yml (+ its pipeline-config.yaml, default the
    quickstart recipe), endpoint.yml, deployment-{blue,green}.yml, environment.yml,
    environment/conda.yml and score/score.py.

    Raises:
        ConfigError: ``green_percent`` is outside 0..100 or ``pipeline_config`` is missing.
    """
    if not 0 <= green_percent <= 100:
        raise ConfigError(
            f"green_percent = {green_percent} is not a share of traffic",
            hint="pass --green-percent between 0 and 100",
        )
    if pipeline_config is None:
        recipe = resources.files("modelkiln").joinpath("recipes").joinpath("quickstart.yaml")
        config_text = recipe.read_text("utf-8")
    elif Path(pipeline_config).is_file():
        config_text = Path(pipeline_config).read_text("utf-8")
    else:
        raise ConfigError(
            f"pipeline_config {str(pipeline_config)!r} does not exist",
            hint="pass an existing pipeline YAML to --pipeline-config",
        )
    base = Path(out) / "azureml"
    blue, green = _models(cfg)
    script = resources.files("modelkiln.deploy").joinpath("azureml_score.py").read_text("utf-8")
    files = {
        "pipeline.yml": dump(pipeline(cfg)),
        "pipeline-config.yaml": config_text,
        "endpoint.yml": dump(endpoint(cfg, green_percent)),
        "deployment-blue.yml": dump(deployment(cfg, "blue", blue)),
        "deployment-green.yml": dump(deployment(cfg, "green", green)),
        "environment.yml": dump(environment(cfg)),
        "environment/conda.yml": dump(conda(cfg)),
        "score/score.py": script,
    }
    return [write(base / rel, text) for rel, text in files.items()]
