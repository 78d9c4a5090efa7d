"""The monitor inside ``kiln serve``: profiles found next to the models, routes, gauges.

:class:`MonitorExtension` is a server extension (:mod:`modelkiln.contract.serving`):
on by default. For every served model it looks for ``<model dir>/monitor_profile``;
a missing, corrupt or mismatched profile logs one warning, sets
``ml_monitor_profile{model,status}`` and the model is served unmonitored (its
request rate, errors and latency still show). Routes: ``GET /v1/monitor`` (JSON)
and ``GET /dashboard`` (a static page polling it).

Example::

    hooks = monitor_hooks(cfg)             # library use: create_app(cfg, hooks=hooks)
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.monitor.online import DriftMonitor, MonitorConfig
from modelkiln.monitor.profile import PROFILE_DIR, Profile, load_profile, model_hash
from modelkiln.monitor.prometheus import DriftCollector

if TYPE_CHECKING:
    import argparse

    from modelkiln.contract.serving import ServeHooks

log = logging.getLogger("modelkiln.monitor")


def load_profiles(
    models: list[tuple[str, Path]],
) -> tuple[dict[str, Profile], dict[str, tuple[str, str]]]:
    """The profiles of ``(served name, model dir)`` pairs, and every model's profile status."""
    profiles: dict[str, Profile] = {}
    status: dict[str, tuple[str, str]] = {}
    for name, path in models:
        folder = path / PROFILE_DIR
        fix = f"kiln monitor profile {path} --data DIR"
        if not (folder / "profile.json").is_file():
            status[name] = ("missing", f"no reference profile at {folder}")
            log.warning("drift monitoring is off for model '%s': no reference profile at %s"
                        " — fix: %s", name, folder, fix)  # fmt: skip
            continue
        try:
            profiles[name] = load_profile(folder, model_hash=model_hash(path))
            status[name] = ("ok", str(folder))
        except ArtifactError as e:
            kind = "mismatched" if "another model" in e.message else "corrupt"
            status[name] = (kind, str(e))
            log.warning("drift monitoring is off for model '%s': %s", name, e)
    return profiles, status


def monitor_router(monitor: DriftMonitor, extra: Any = None) -> Any:
    """``GET /v1/monitor`` and ``GET /dashboard`` over ``monitor`` (``extra()`` adds keys)."""
    from fastapi import APIRouter
    from fastapi.responses import HTMLResponse, JSONResponse

    router = APIRouter()
    page = resources.files("modelkiln.monitor").joinpath("dashboard.html").read_text()

    @router.get("/v1/monitor", tags=["monitoring"])
    def monitor_state() -> JSONResponse:
        """Drift state per model/version/feature, service statistics and recent alerts."""
        body = monitor.snapshot()
        if extra is not None:
            body.update(extra())
        return JSONResponse(body)

    @router.get("/dashboard", tags=["monitoring"], response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        """The status page: a static page that polls /v1/monitor."""
        return HTMLResponse(page)

    return router


def monitor_hooks(
    cfg: Any, config: MonitorConfig | None = None, *, alert_rules: Path | None = None
) -> ServeHooks:
    """Hooks for a ``ServeConfig``: the started monitor as observer, its routes and gauges."""
    from modelkiln.contract.serving import ServeHooks

    models = [(m.served_name, Path(str(m.path))) for m in cfg.models]
    profiles, status = load_profiles(models)
    monitor = DriftMonitor(profiles, config, profile_status=status)
    extra = None
    if alert_rules is not None:
        from modelkiln.monitor.alerts import AlertManager

        alerts = AlertManager.from_yaml(alert_rules)
        alerts.attach(monitor)
        extra = lambda: {"alerts": alerts.recent()}  # noqa: E731
    monitor.start()
    return ServeHooks(
        observers=[monitor], routers=[monitor_router(monitor, extra)],
        collectors=[DriftCollector(monitor)],
    )  # fmt: skip


class MonitorExtension:
    """``kiln serve`` flags of the monitor and the hooks they give."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """--no-monitor, --monitor-window, --monitor-check-every, --monitor-logprob-rate ..."""
        g = parser.add_argument_group("monitoring")
        g.add_argument("--no-monitor", action="store_true",
                       help="turn drift monitoring, /v1/monitor and /dashboard off")  # fmt: skip
        g.add_argument("--monitor-window", type=int, metavar="N",
                       help="values per feature window (default 500)")  # fmt: skip
        g.add_argument("--monitor-check-every", type=int, metavar="N",
                       help="test the windows every N requests (default 250)")  # fmt: skip
        g.add_argument("--alert-rules", type=Path, metavar="YAML",
                       help="alert rules and channels (see kiln monitor --help)")  # fmt: skip
        g.add_argument("--monitor-logprob-rate", type=float, metavar="SHARE",
                       help="share of generation requests scored for the log-prob features "
                            "(default 0.1; scoring costs engine time)")  # fmt: skip
        g.add_argument(
            "--monitor-log",
            type=Path,
            metavar="JSONL",
            help="log request features (no prompts) for kiln monitor report",
        )

    def hooks(self, args: argparse.Namespace, cfg: Any) -> ServeHooks | None:
        """The monitor's hooks, or None with --no-monitor."""
        if getattr(args, "no_monitor", False):
            return None
        fields: dict[str, Any] = {}
        if getattr(args, "monitor_window", None):
            fields["window"] = args.monitor_window
        if getattr(args, "monitor_check_every", None):
            fields["check_every_requests"] = args.monitor_check_every
        if getattr(args, "monitor_logprob_rate", None) is not None:
            fields["logprob_sample_rate"] = args.monitor_logprob_rate
        if getattr(args, "monitor_log", None):
            fields["feature_log"] = args.monitor_log
        try:
            config = MonitorConfig(**fields)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(
                f"invalid monitor flag value {err.get('input')!r} for {err['loc'][0]}: "
                f"{err['msg']}",
                hint="--monitor-logprob-rate takes a share in (0, 1]; windows are >= 20",
            ) from None
        return monitor_hooks(cfg, config, alert_rules=getattr(args, "alert_rules", None))
