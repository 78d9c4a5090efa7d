"""Start the written Ray Serve config on a local (or given) Ray cluster: ``kiln deploy ray --run``.

Example:
    >>> start(load_ray_config(models=[{"path": "runs/x/model"}], num_replicas=2))
    >>> run_forever()   # Ctrl-C shuts Serve down
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from modelkiln.deploy.ray_config import RayDeployConfig, serve_run_config
from modelkiln.errors import DependencyMissingError


def require_ray() -> None:
    """Raise :class:`DependencyMissingError` naming the ``ray`` extra when Ray Serve is absent."""
    try:
        found = importlib.util.find_spec("ray") is not None
        found = found and importlib.util.find_spec("ray.serve") is not None
    except (ImportError, ValueError):  # a half-installed or shadowed ray
        found = False
    if not found:
        raise DependencyMissingError("ray[serve]", "ray", purpose="kiln deploy ray")


def start(cfg: RayDeployConfig, *, address: str | None = None, num_cpus: int | None = None) -> Any:
    """Deploy every application of ``cfg`` (not blocking); return ``serve.status()``.

    Joins the cluster at ``address`` (``auto``: a running ``ray start`` one) or starts a
    local Ray without the dashboard.
    """
    require_ray()
    import ray
    from ray import serve

    from modelkiln.deploy.ray_app import build_app

    if not ray.is_initialized():
        extra: dict[str, Any] = {}
        if address is None and cfg.metrics_export_port is not None:
            extra["_metrics_export_port"] = cfg.metrics_export_port  # ray start's flag
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, **extra)
    doc = serve_run_config(cfg)
    serve.start(http_options=doc["http_options"])
    for app in doc["applications"]:
        serve.run(
            build_app(app["args"]),
            name=app["name"],
            route_prefix=app["route_prefix"],
            blocking=False,
        )
    return serve.status()


def run_forever(poll_s: float = 1.0) -> None:
    """Block until Ctrl-C / SIGTERM, then shut Serve and Ray down."""
    import ray
    from ray import serve

    try:
        while True:
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
