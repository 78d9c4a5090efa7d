"""Deployment artifacts generated from one :class:`DeployConfig`: Docker + compose,
Kubernetes manifests + a Helm chart, and Azure ML jobs / endpoints. Each file is built
from typed data (no string templates) and validated offline against published schemas.

Example:
    >>> cfg = load_deploy_config(model_path="runs/quickstart/optimize/promoted")
    >>> write_k8s(cfg, "deploy-out")  # deploy-out/k8s/*.yaml and deploy-out/helm/<name>/
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelkiln.deploy.azureml import write_azureml
    from modelkiln.deploy.config import DeployConfig, load_deploy_config
    from modelkiln.deploy.docker import write_docker
    from modelkiln.deploy.kube import write_k8s

_EXPORTS = {
    "DeployConfig": "modelkiln.deploy.config",
    "load_deploy_config": "modelkiln.deploy.config",
    "write_docker": "modelkiln.deploy.docker",
    "write_k8s": "modelkiln.deploy.kube",
    "write_azureml": "modelkiln.deploy.azureml",
}

__all__ = ["DeployConfig", "load_deploy_config", "write_azureml", "write_docker", "write_k8s"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkiln.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
