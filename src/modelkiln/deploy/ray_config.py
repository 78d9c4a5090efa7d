"""``kiln deploy ray``: the config of a Ray Serve deployment and the ``serve run`` YAML.

One Ray Serve application per model, each with one deployment (``kiln``) that runs the
modelkiln server app (:mod:`modelkiln.deploy.ray_app`) behind Serve's FastAPI ingress. The
written ``serve_config.yaml`` is what ``serve run serve_config.yaml`` / ``serve deploy``
read: ``import_path`` + ``args`` + ``deployments`` per application. Ray is not imported here.

Example:
    >>> cfg = load_ray_config(models=[{"path": "runs/x/optimize/model"}],
    ...                       autoscaling={"min_replicas": 1, "max_replicas": 4})
    >>> write_ray(cfg, Path("deploy-ray"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from modelkiln.configbase import KilnModel, load_section
from modelkiln.deploy import _yaml
from modelkiln.errors import ConfigError

#: The builder Ray imports (``serve run`` resolves it in every replica's process).
IMPORT_PATH = "modelkiln.deploy.ray_app:build_app"
#: Name of the one deployment inside each application.
DEPLOYMENT_NAME = "kiln"
#: Weight files counted for the memory check.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".pth", ".data", ".gguf")


class Predictive(KilnModel):
    """The predictive policy (:mod:`modelkiln.deploy.ray_policy`) instead of Serve's default."""

    service_time_s: float = Field(0.2, gt=0, description="Mean time one request takes, s.")
    slots_per_replica: int = Field(8, ge=1, description="Requests one replica serves at once.")
    p95_target_s: float = Field(1.0, gt=0, description="p95 latency to stay under, s.")
    buffer: float = Field(1.2, ge=1, description="Head-room on the forecast rate.")
    sample_s: float = Field(60.0, gt=0, description="One history sample per this many s.")
    season: int = Field(1440, ge=2, description="Samples per season (1440 x 60 s = a day).")
    horizon: int = Field(30, ge=1, description="Samples ahead the forecast peak is taken over.")
    z: float = Field(
        0.0, ge=0, description="Add z x the RMS error of past peak forecasts (head-room)."
    )
    share: float = Field(
        0.95, gt=0, lt=1, description="Share of requests within p95_target_s the sizing aims at."
    )
    floor: bool = Field(True, description="Never fewer replicas than the rate seen now needs.")


class Autoscaling(KilnModel):
    """Ray Serve ``autoscaling_config`` (reactive: ongoing requests per replica)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero).")
    max_replicas: int = Field(10, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at start (default min_replicas)."
    )
    target_ongoing_requests: float = Field(
        10.0, gt=0, description="Ongoing requests per replica the autoscaler aims at."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long.")
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window the ongoing-request average is taken over."
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas report load (Ray's default 10 s)."
    )
    predictive: Predictive | None = Field(
        None, description="Forecast-driven policy (Holt-Winters + M/M/c); None: Serve's own."
    )


class ActorOptions(KilnModel):
    """Ray ``ray_actor_options`` of one replica."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    memory: int | None = Field(
        None, ge=0, description="Memory reserved per replica, bytes (checked against the model)."
    )


class RayModel(KilnModel):
    """One model = one Ray Serve application with one deployment."""

    path: Path = Field(description="Model directory (what `kiln serve` serves).")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Served name and application name; default the directory's name.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Other `kiln serve` model fields of this model (e.g. {backend: torch}); "
        "checked by each replica when it starts.",
    )

    @property
    def served_name(self) -> str:
        """``name`` or the directory's name."""
        return self.name or self.path.resolve().name


class RayDeployConfig(KilnModel):
    """Everything ``kiln deploy ray`` writes and runs."""

    models: list[RayModel] = Field(min_length=1, description="Models; one application each.")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replicas (no autoscaling).")
    autoscaling: Autoscaling | None = Field(None, description="Autoscaling instead of fixed.")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica holds at once; the rest queue in Serve."
    )
    ingress: bool = Field(
        True,
        description="modelkiln's ingress deployment in front of the replicas: a request whose "
        "replica dies is re-sent, else 503. false: Serve's proxy calls the replicas directly "
        "(one hop less; such a request then gets Ray's bare 500).",
    )
    retries: int = Field(
        1,
        ge=0,
        le=5,
        description="Times the ingress re-sends a request whose replica died before answering; "
        "then 503 + Retry-After.",
    )
    graceful_shutdown_timeout_s: float = Field(
        30.0, ge=0, description="A stopping replica finishes its requests for this long."
    )
    ray_actor_options: ActorOptions = Field(
        default_factory=ActorOptions, description="Per replica."
    )
    memory_factor: float = Field(
        2.0, ge=1, description="Replica memory needed = weight files' bytes × this factor."
    )
    host: str = Field("127.0.0.1", description="Interface of Serve's HTTP proxy.")
    port: int = Field(8000, ge=0, le=65535, description="Port of Serve's HTTP proxy.")
    metrics_export_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of Ray's Prometheus endpoint (ray_serve_* of every replica) when "
        "--run starts a local Ray; None: Ray picks one.",
    )
    serve: dict[str, Any] = Field(
        default_factory=dict,
        description="ServeConfig fields for every replica (e.g. {cache: {enabled: false}}).",
    )


def _weights_bytes(path: Path) -> int:
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
    )


def _check(cfg: RayDeployConfig) -> None:
    """The cross-field rules, each naming its field (pydantic would report them at the root)."""
    auto = cfg.autoscaling
    if cfg.num_replicas is not None and auto is not None:
        raise ConfigError(
            "ray config: num_replicas and autoscaling are both set",
            hint="use --replicas N (fixed) or the --min/--max-replicas flags (autoscaling)",
        )
    if auto is not None and auto.min_replicas > auto.max_replicas:
        raise ConfigError(
            f"ray config: autoscaling.min_replicas={auto.min_replicas} > "
            f"max_replicas={auto.max_replicas}",
            hint="set min_replicas <= max_replicas",
        )
    if (
        auto is not None
        and auto.initial_replicas is not None
        and not (auto.min_replicas <= auto.initial_replicas <= auto.max_replicas)
    ):
        raise ConfigError(
            f"ray config: autoscaling.initial_replicas={auto.initial_replicas} is outside "
            f"[{auto.min_replicas}, {auto.max_replicas}]",
            hint="set min_replicas <= initial_replicas <= max_replicas",
        )
    pred = auto.predictive if auto is not None else None
    if pred is not None and pred.p95_target_s <= pred.service_time_s:
        raise ConfigError(
            f"ray config: autoscaling.predictive.p95_target_s={pred.p95_target_s} must exceed "
            f"service_time_s={pred.service_time_s}",
            hint="raise the latency target or lower the service time",
        )
    memory = cfg.ray_actor_options.memory
    for model in cfg.models:
        if not model.path.is_dir():
            raise ConfigError(
                f"ray config: models.path: {model.path} is not a directory",
                hint="pass an existing model directory to --model-path",
            )
        need = int(_weights_bytes(model.path) * cfg.memory_factor)
        if memory is not None and memory < need:
            raise ConfigError(
                f"ray config: ray_actor_options.memory={memory} bytes is below what "
                f"{model.path} needs ({need} bytes = weight files × memory_factor "
                f"{cfg.memory_factor})",
                hint=f"raise --memory to at least {need} or serve a smaller variant",
            )
    names = [m.served_name for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"ray config: models.name: duplicate names {names}", hint="set name")


def load_ray_config(
    data: dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> RayDeployConfig:
    """Validate a :class:`RayDeployConfig` from a mapping or YAML, ``a.b=v`` overrides, fields.

    Raises:
        ConfigError: naming the bad field, its value and the fix.
    """
    cfg = load_section(RayDeployConfig, data, overrides, named=fields, label="ray config")
    _check(cfg)
    return cfg


def deployment_options(cfg: RayDeployConfig) -> dict[str, Any]:
    """The ``deployments[]`` entry (also what the builder passes to ``.options``)."""
    opts: dict[str, Any] = {"name": DEPLOYMENT_NAME}
    if cfg.autoscaling is not None:
        auto = cfg.autoscaling.model_dump(exclude_none=True, exclude={"predictive"})
        if cfg.autoscaling.predictive is not None:
            from modelkiln.deploy.ray_policy import POLICY_PATH

            kwargs = cfg.autoscaling.predictive.model_dump()
            auto["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": kwargs}
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = cfg.num_replicas or 1
    opts["max_ongoing_requests"] = cfg.max_ongoing_requests
    opts["graceful_shutdown_timeout_s"] = cfg.graceful_shutdown_timeout_s
    opts["ray_actor_options"] = cfg.ray_actor_options.model_dump(exclude_none=True)
    return opts


def route_prefix(cfg: RayDeployConfig, model: RayModel) -> str:
    """``/`` for a single model (the same URLs as `kiln serve`), else ``/<name>``."""
    return "/" if len(cfg.models) == 1 else f"/{model.served_name}"


def serve_run_config(cfg: RayDeployConfig) -> dict[str, Any]:
    """The ``serve run`` / ``serve deploy`` config (Ray's ServeDeploySchema shape)."""
    apps = []
    for model in cfg.models:
        opts = deployment_options(cfg)
        spec = {**model.options, "path": str(model.path.resolve()), "name": model.served_name}
        apps.append(
            {
                "name": model.served_name,
                "route_prefix": route_prefix(cfg, model),
                "import_path": IMPORT_PATH,
                "args": {
                    "model": spec,
                    "serve": cfg.serve,
                    "deployment": opts,
                    "ingress": cfg.ingress,
                    "retries": cfg.retries,
                },
                "deployments": [opts],
            }
        )
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": apps,
    }


def write_ray(cfg: RayDeployConfig, out: Path) -> list[Path]:
    """Write ``serve_config.yaml`` into ``out``; return the written paths."""
    text = (
        "# Ray Serve config written by `kiln deploy ray`. Start it with\n"
        "#   serve run serve_config.yaml     (or: kiln deploy ray ... --run)\n"
        + _yaml.dump(serve_run_config(cfg))
    )
    return [_yaml.write(out / "serve_config.yaml", text)]
