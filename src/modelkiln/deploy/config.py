"""One validated :class:`DeployConfig` drives every deployment target (Docker, Kubernetes,
Helm, Azure ML), so an image name or a drain timeout is set once.

Example:
    >>> cfg = load_deploy_config({"model_path": "runs/quickstart/optimize/promoted"})
    >>> cfg.grace_period_s  # preStop sleep + drain timeout + margin
    40
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from modelkiln.configbase import FieldError, KilnModel, load_section

#: Kubernetes resource quantity grammar (k8s.io/apimachinery resource.Quantity), e.g.
#: ``500m``, ``2``, ``1.5``, ``4Gi``, ``1e3``. Hand-written because no maintained
#: Python package parses quantities without the whole kubernetes client.
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")

#: Known accelerators: the ``nvidia.com/gpu.product`` node label (GPU feature discovery)
#: and the Azure ML instance type that carries one of them.
GPU_TYPES: dict[str, dict[str, str]] = {
    "nvidia-t4": {"product": "Tesla-T4", "azure_sku": "Standard_NC4as_T4_v3"},
    "nvidia-a10": {"product": "NVIDIA-A10", "azure_sku": "Standard_NV36ads_A10_v5"},
    "nvidia-a100": {"product": "NVIDIA-A100-SXM4-80GB", "azure_sku": "Standard_NC24ads_A100_v4"},
    "nvidia-h100": {"product": "NVIDIA-H100-80GB-HBM3", "azure_sku": "Standard_NC40ads_H100_v5"},
}

#: Routes of the modelkiln server (modelkiln.serve.app); a test checks they still exist.
LIVENESS_PATH = "/health"
READINESS_PATH = "/ready"
METRICS_PATH = "/metrics"
#: Gauge of in-flight requests exported by the server, used as the custom scaling metric.
IN_FLIGHT_METRIC = "ml_requests_in_flight"
#: Where the model lives inside the container.
MODEL_MOUNT = "/models"


def _installed(dist: str, fallback: str) -> str:
    """Installed version of ``dist`` without its local part (``2.5.1+cpu`` -> ``2.5.1``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist).split("+", 1)[0]
    except PackageNotFoundError:
        return fallback


class Resources(KilnModel):
    """CPU / memory requests and limits of one server container (Kubernetes quantities)."""

    cpu_request: str = Field("1", description="CPU request, e.g. '500m' or '2'.")
    cpu_limit: str = Field("2", description="CPU limit.")
    memory_request: str = Field("2Gi", description="Memory request, e.g. '2Gi'.")
    memory_limit: str = Field("4Gi", description="Memory limit (the pod is killed above it).")

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not _QUANTITY.match(str(value)):
            raise ValueError(
                f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 1.5, 512Mi, 4Gi)"
            )
        return str(value)


class DeployConfig(KilnModel):
    """Everything the generated Docker, Kubernetes, Helm and Azure ML files depend on."""

    name: str = Field(
        "modelkiln",
        pattern=r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$",
        description="Name of the app: Kubernetes object names, compose service, Azure endpoint.",
    )
    namespace: str = Field("default", description="Kubernetes namespace.")
    model_path: Path | None = Field(
        None, description="Local model directory (a promoted variant or a train/model dir)."
    )
    model: str | None = Field(
        None,
        pattern=r"^registry://\S+$",
        description="registry://NAME[@VERSION] model reference, passed through to the server.",
    )
    served_name: str | None = Field(
        None, description="Name clients pass as 'model' (default: the model directory's name)."
    )
    bake_model: bool = Field(
        False, description="Copy the model into the image instead of mounting it at run time."
    )
    image: str = Field("modelkiln-server:latest", description="Image reference (repo:tag).")
    package: str = Field(
        default_factory=lambda: f"modelkiln[serve,onnx]=={_installed('modelkiln', '1.0.0')}",
        description="pip requirement that installs modelkiln in the image (or a wheel path "
        "inside the build context, e.g. ./wheels/modelkiln-1.0-py3-none-any.whl).",
    )
    torch_version: str = Field(
        default_factory=lambda: _installed("torch", "2.5.1"),
        pattern=r"^\d+\.\d+(\.\d+)?$",
        description="torch pinned in the CPU image (default: the version installed here).",
    )
    port: int = Field(8000, ge=1, le=65535, description="Container port of the server.")
    replicas_min: int = Field(2, ge=1, description="Fewest replicas (HPA / KEDA minimum).")
    replicas_max: int = Field(10, ge=1, description="Most replicas (HPA / KEDA maximum).")
    cpu_target_percent: int = Field(70, ge=1, le=100, description="HPA CPU utilization target.")
    memory_target_percent: int = Field(80, ge=1, le=100, description="HPA memory target.")
    ongoing_requests_target: int = Field(
        10, ge=1, description=f"In-flight requests per pod ({IN_FLIGHT_METRIC}) to scale at."
    )
    resources: Resources = Field(default_factory=Resources)
    gpu: str | None = Field(None, description=f"GPU type, one of {sorted(GPU_TYPES)}; None=CPU.")
    gpu_count: int = Field(1, ge=1, description="GPUs per replica when gpu is set.")
    drain_timeout_s: int = Field(
        30, ge=0, description="Seconds the server drains on SIGTERM (serve drain_timeout_s)."
    )
    prestop_sleep_s: int = Field(
        5, ge=0, description="preStop sleep so load balancers drop the pod before SIGTERM."
    )
    model_pvc: str | None = Field(
        None, description="Kubernetes PersistentVolumeClaim holding the model (else: baked)."
    )
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus the KEDA trigger queries.",
    )
    python_version: str = Field("3.11", pattern=r"^3\.\d+$", description="Python of the image.")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        if value is not None and value not in GPU_TYPES:
            raise ValueError(f"unknown GPU type; known: {', '.join(sorted(GPU_TYPES))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeployConfig:
        if self.replicas_min > self.replicas_max:
            raise FieldError(
                "replicas_min",
                f"replicas_min ({self.replicas_min}) > replicas_max ({self.replicas_max})",
                hint="set replicas_min <= replicas_max",
            )
        if (self.model_path is None) == (self.model is None):
            raise FieldError(
                "model_path",
                "give exactly one of model_path and model (registry://...)",
                hint="pass --model-path DIR or --model registry://NAME",
            )
        if self.model_path is not None and not Path(self.model_path).is_dir():
            raise FieldError(
                "model_path",
                f"model_path {str(self.model_path)!r} is not a directory",
                hint="pass an existing model directory to --model-path",
            )
        if self.bake_model and self.model_path is None:
            raise FieldError(
                "bake_model",
                "bake_model needs a local model_path",
                hint="pass --model-path DIR, or drop --bake",
            )
        return self

    @property
    def model_name(self) -> str:
        """Served model name: ``served_name``, else the directory or registry name."""
        if self.served_name:
            return self.served_name
        if self.model_path is not None:
            return Path(self.model_path).resolve().name
        return str(self.model).removeprefix("registry://").split("@")[0].rsplit("/", 1)[-1]

    @property
    def model_arg(self) -> str:
        """``--model-path`` value inside the container."""
        if self.model is not None:
            return self.model
        return f"{MODEL_MOUNT}/{self.model_name}"

    @property
    def grace_period_s(self) -> int:
        """terminationGracePeriodSeconds: preStop sleep + the drain + 5 s to exit."""
        return self.prestop_sleep_s + self.drain_timeout_s + 5

    def serve_args(self) -> list[str]:
        """The server's command-line arguments (listens on all interfaces in a container)."""
        return [
            "--model-path", self.model_arg, "--name", self.model_name,
            "--host", "0.0.0.0", "--port", str(self.port),
            "--drain-timeout", str(self.drain_timeout_s),
        ]  # fmt: skip


def load_deploy_config(
    data: dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> DeployConfig:
    """Validate a :class:`DeployConfig` from a mapping or YAML file, ``a.b=value``
    overrides, then keyword fields (None skipped: named flags win).

    Raises:
        ConfigError: naming the bad field, its value and the fix.
    """
    return load_section(DeployConfig, data, overrides, named=fields, label="deploy config")
