"""``kiln deploy``: Docker / compose, Kubernetes + Helm, and Azure ML files from one config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from modelkiln.cli._common import SetOpt, console, guard

if TYPE_CHECKING:
    from modelkiln.deploy.config import DeployConfig

deploy_app = typer.Typer(
    help="Write deployment files for a model: Dockerfile + compose stack, Kubernetes manifests "
    "+ Helm chart, Azure ML pipeline + endpoint. One config drives all three; every file is "
    "validated offline against its published schema."
    "\n\nExample: kiln deploy k8s deploy-out --model-path runs/quickstart/optimize/model",
    no_args_is_help=True,
)

OutArg = Annotated[Path, typer.Argument(help="Directory to write the files into.")]
ModelPathOpt = Annotated[
    Path | None, typer.Option("--model-path", help="Model directory (e.g. a promoted variant).")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="registry://NAME[@VERSION], passed to the server.")
]
DeployConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="DeployConfig YAML (flags override it).")
]
NameOpt = Annotated[str | None, typer.Option("--name", help="App name (default modelkiln).")]
ImageOpt = Annotated[str | None, typer.Option("--image", help="Image reference repo:tag.")]
MinOpt = Annotated[int | None, typer.Option("--replicas-min", help="Fewest replicas (2).")]
MaxOpt = Annotated[int | None, typer.Option("--replicas-max", help="Most replicas (10).")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help="GPU type, e.g. nvidia-l4.")]
DrainOpt = Annotated[
    int | None, typer.Option("--drain-timeout", help="Server drain on SIGTERM, s (30).")
]


def _config(config: Path | None, sets: list[str] | None, **fields: object) -> DeployConfig:
    from modelkiln.deploy.config import load_deploy_config

    return load_deploy_config(config, sets, **fields)


def _report(paths: list[Path], out: Path) -> None:
    for p in paths:
        console.print(f"  wrote {p}", highlight=False)
    console.print(f"[green]{len(paths)} files[/green] in {out}")


@deploy_app.command("docker")
def docker_cmd(
    out: OutArg,
    model_path: ModelPathOpt = None,
    model: ModelOpt = None,
    config: DeployConfigOpt = None,
    set_: SetOpt = None,
    name: NameOpt = None,
    image: ImageOpt = None,
    gpu: GpuOpt = None,
    drain_timeout: DrainOpt = None,
    bake: Annotated[bool, typer.Option("--bake", help="Copy the model into the image.")] = False,
) -> None:
    """Dockerfile (CPU) + Dockerfile.cuda, .dockerignore, compose.yaml (server, Redis,
    Prometheus, Grafana), monitoring files and .env.example.

    Example: kiln deploy docker deploy-out --model-path runs/quickstart/optimize/model
    """
    from modelkiln.deploy.docker import write_docker

    with guard():
        cfg = _config(config, set_, model_path=model_path, model=model, name=name, image=image,
                      gpu=gpu, drain_timeout_s=drain_timeout, bake_model=bake or None)  # fmt: skip
        _report(write_docker(cfg, out), out)


@deploy_app.command("k8s")
def k8s_cmd(
    out: OutArg,
    model_path: ModelPathOpt = None,
    model: ModelOpt = None,
    config: DeployConfigOpt = None,
    set_: SetOpt = None,
    name: NameOpt = None,
    image: ImageOpt = None,
    replicas_min: MinOpt = None,
    replicas_max: MaxOpt = None,
    gpu: GpuOpt = None,
    drain_timeout: DrainOpt = None,
) -> None:
    """Kubernetes manifests (k8s/*.yaml, k8s/all.yaml) and a Helm chart (helm/NAME/).

    Example: kiln deploy k8s deploy-out --model-path runs/quickstart/optimize/model
    --set resources.memory_limit=8Gi
    """
    from modelkiln.deploy.kube import write_k8s

    with guard():
        cfg = _config(config, set_, model_path=model_path, model=model, name=name, image=image,
                      replicas_min=replicas_min, replicas_max=replicas_max, gpu=gpu,
                      drain_timeout_s=drain_timeout)  # fmt: skip
        _report(write_k8s(cfg, out), out)


@deploy_app.command("azureml")
def azureml_cmd(
    out: OutArg,
    model_path: ModelPathOpt = None,
    model: ModelOpt = None,
    config: DeployConfigOpt = None,
    set_: SetOpt = None,
    name: NameOpt = None,
    gpu: GpuOpt = None,
    green: Annotated[int, typer.Option("--green-percent", help="Traffic to green (10).")] = 10,
    pipeline_config: Annotated[
        Path | None, typer.Option("--pipeline-config", help="Pipeline YAML the job runs.")
    ] = None,
) -> None:
    """Azure ML: pipeline job (train -> evaluate -> register), managed online endpoint with
    blue / green deployments, environment and scoring script.

    Example: kiln deploy azureml deploy-out --model-path runs/quickstart/optimize/model
    """
    from modelkiln.deploy.azureml import write_azureml

    with guard():
        cfg = _config(config, set_, model_path=model_path, model=model, name=name, gpu=gpu)
        _report(write_azureml(cfg, out, green, pipeline_config), out)


@deploy_app.command("ray")
def ray_cmd(
    out: OutArg,
    model_path: Annotated[
        list[Path] | None,
        typer.Option("--model-path", help="Model directory; repeat for one application each."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Ray deploy config YAML (RayDeployConfig; flags win)."),
    ] = None,
    set_: SetOpt = None,
    replicas: Annotated[int | None, typer.Option("--replicas", help="Fixed replicas.")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="Autoscaling: fewest (1).")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscaling: most (10).")] = None,
    initial_replicas: Annotated[int | None, typer.Option(help="Autoscaling: at start.")] = None,
    target_ongoing_requests: Annotated[
        float | None, typer.Option(help="Autoscaling: ongoing requests per replica (10).")
    ] = None,
    upscale_delay_s: Annotated[float | None, typer.Option(help="Autoscaling: s (30).")] = None,
    downscale_delay_s: Annotated[float | None, typer.Option(help="Autoscaling: s (600).")] = None,
    predictive: Annotated[
        bool,
        typer.Option(
            "--predictive",
            help="Autoscale with modelkiln's forecast policy (Holt-Winters + M/M/c) instead of "
            "Serve's reactive one; tune it with --set autoscaling.predictive.p95_target_s=...",
        ),
    ] = False,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs per replica (1).")] = None,
    memory: Annotated[int | None, typer.Option(help="Memory per replica, bytes.")] = None,
    port: Annotated[int | None, typer.Option(help="Serve HTTP port (8000).")] = None,
    metrics_export_port: Annotated[
        int | None,
        typer.Option(help="With --run: port of Ray's Prometheus endpoint (ray_serve_* metrics)."),
    ] = None,
    run: Annotated[bool, typer.Option("--run", help="Start it now (Ctrl-C stops).")] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join with --run (default: a local one).")
    ] = None,
) -> None:
    """Ray Serve: the same server as `kiln serve`, one application + deployment per model,
    fixed replicas or autoscaling; writes serve_config.yaml (for `serve run`), --run starts it.

    Example: kiln deploy ray deploy-ray --model-path runs/quickstart/optimize/model
    --min-replicas 1 --max-replicas 4 --target-ongoing-requests 8 --run
    """
    from modelkiln.deploy.ray_config import load_ray_config, write_ray
    from modelkiln.deploy.ray_run import require_ray, run_forever, start

    auto = {"min_replicas": min_replicas, "max_replicas": max_replicas,
            "initial_replicas": initial_replicas,
            "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s}  # fmt: skip
    auto = {k: v for k, v in auto.items() if v is not None}
    actor = {k: v for k, v in {"num_cpus": num_cpus, "memory": memory}.items() if v is not None}
    with guard():
        require_ray()
        models = [{"path": p} for p in model_path] if model_path else None
        sets = [*(set_ or []), *(f"ray_actor_options.{k}={v}" for k, v in actor.items())]
        sets += [f"autoscaling.{k}={v}" for k, v in auto.items()]
        sets = (["autoscaling.predictive={}"] if predictive else []) + sets
        cfg = load_ray_config(
            config,
            sets,
            models=models,
            num_replicas=replicas,
            port=port,
            metrics_export_port=metrics_export_port,
        )
        _report(write_ray(cfg, out), out)
        if run:
            start(cfg, address=address)
            console.print(f"Ray Serve on http://{cfg.host}:{cfg.port} (Ctrl-C stops)")
            run_forever()


def register(app: typer.Typer) -> None:
    """Add ``deploy`` to the root app."""
    app.add_typer(deploy_app, name="deploy")
