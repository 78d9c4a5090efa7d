"""Put the gateway in front of a real model server: one served model per version,
the controller on the real clock, the registry updated when a rollout promotes.

Uses only the serve stage's public API (``modelkiln.serve.create_app``,
``ServeConfig``, ``ModelSpec``), imported when a gateway is built.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from modelkiln.contract.audit import AuditLog
from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.rollout.controller import Controller
from modelkiln.rollout.drift import HttpDriftProbe
from modelkiln.rollout.faults import FaultInjector
from modelkiln.rollout.gateway import RolloutGateway, served_name
from modelkiln.rollout.plan import AdapterMode, plan_models
from modelkiln.rollout.policy import TrafficPolicy
from modelkiln.rollout.recorder import Recorder
from modelkiln.rollout.registry import Registry
from modelkiln.rollout.spec import RolloutState
from modelkiln.rollout.state import StateStore


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        """The current time."""
        return time.monotonic()


def registry_versions(
    registry: Registry, model: str, versions: list[str] | None
) -> tuple[dict[str, Path], str]:
    """Verified folders of the versions to load, and the one serving at start (production).

    Default: the production version plus the staging one (when there is one).
    """
    prod = registry.show(model, "production")
    wanted = versions or [str(prod.version)]
    if not versions:
        with contextlib.suppress(ArtifactError):  # no staging version: production alone
            wanted.append(str(registry.show(model, "staging").version))
    folders = {v: registry.resolve(model, v) for v in dict.fromkeys(wanted)}
    serving = str(prod.version) if str(prod.version) in folders else next(iter(folders))
    return folders, serving


def build_gateway(
    model: str,
    folders: dict[str, Path],
    *,
    serving: str,
    state_dir: Path,
    admin_keys: list[str],
    serve_config: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    registry: Registry | None = None,
    faults: dict[str, FaultInjector] | None = None,
    tick_s: float = 1.0,
    audit_log: Path | None = None,
    monitor_url: str | None = None,
    hooks: Any = None,
    plugins: bool = False,
    adapters: AdapterMode = "runtime",
) -> RolloutGateway:
    """A :class:`RolloutGateway` over a fresh model server serving every version in ``folders``.

    Args:
        model: the logical model name clients use.
        folders: version label -> model folder.
        serving: the version taking all traffic when no rollout is active.
        state_dir: where rollout state and decision logs live.
        admin_keys: keys of the ``/admin`` routes (also passed to the server).
        serve_config: other ``ServeConfig`` fields (api_keys, generation, ...).
        model_options: ``ModelSpec`` fields for every version (backend, precision, kind).
        registry: when given, a promoted rollout makes the candidate the production version.
        faults: version -> fault injector (tests and benchmarks only).
        tick_s: seconds between the controller's polls (test updates and due checks).
        audit_log: hash-chained audit log (``modelkiln.contract.audit``) every decision and
            operator action is written to.
        monitor_url: where ``GET /v1/monitor`` answers for the drift gate (default: this
            gateway's own address, which passes the route to the server it wraps).
        hooks: the server's plug-in hooks (``ServeHooks``: monitor, security, ...).
        plugins: when ``hooks`` is None, plug in what ``kiln serve`` does by default
            (:func:`plugin_hooks`).
        adapters: PEFT adapter versions as runtime adapters on one shared base model, or
            each merged into its own copy (:mod:`.plan`).
    """
    from modelkiln.serve import ModelSpec, ServeConfig, create_app

    if serving not in folders:
        raise ConfigError(f"serving version {serving!r} is not among {sorted(folders)}")
    fields, runtime = plan_models(model, folders, model_options or {}, adapters)
    specs = [ModelSpec(**f) for f in fields]
    internal = [runtime.admin_key] if runtime else []  # the gateway loads the adapters
    cfg = ServeConfig.model_validate(
        {
            **(serve_config or {}),
            "models": [s.model_dump() for s in specs],
            "admin_keys": admin_keys + internal,
        }
    )
    if hooks is None and plugins:
        hooks = plugin_hooks(cfg)
    recorder = Recorder()
    audit = AuditLog(audit_log) if audit_log is not None else None
    box: list[RolloutGateway] = []  # the probe needs the gateway's address, known once it serves
    probe = HttpDriftProbe(
        monitor_url or (lambda: box[0].base_url if box else None),
        lambda m, v: box[0].target(m, v) if box else served_name(m, v),
    )

    def on_finish(state: RolloutState) -> None:
        if registry is not None and state.status == "promoted":
            registry.promote(model, int(state.spec.candidate), "production")

    def factory(apply: Any) -> Controller:
        return Controller(
            StateStore(state_dir), MonotonicClock(), recorder, apply=apply, on_finish=on_finish,
            drift=probe, audit=audit,
        )  # fmt: skip

    gateway = RolloutGateway(
        create_app(cfg, hooks=hooks),
        versions={model: list(folders)},
        serving={model: serving},
        controller_factory=factory,
        recorder=recorder,
        admin_keys=admin_keys,
        faults={(model, v): f for v, f in (faults or {}).items()},
        tick_s=tick_s,
        on_close=audit.close if audit is not None else None,
        adapters=runtime,
        resolve=(lambda m, v: registry.resolve(m, v)) if registry is not None else None,
    )
    box.append(gateway)
    return gateway


def plugin_hooks(cfg: Any, argv: list[str] | None = None) -> Any:
    """The hooks ``kiln serve ARGV`` would plug in (monitor, security, ...), built from the
    contract's extension list, so the versions behind the gateway are monitored like any
    served model (``GET /v1/monitor`` feeds the drift gate). Default: no flags."""
    import argparse

    from modelkiln.contract.serving import SERVE_EXTENSIONS, load_extensions, merge_hooks

    extensions = load_extensions(SERVE_EXTENSIONS)
    parser = argparse.ArgumentParser(add_help=False)
    for ext in extensions:
        ext.add_arguments(parser)
    args = parser.parse_args(argv or [])
    return merge_hooks(*(ext.hooks(args, cfg) for ext in extensions))


def run_gateway(gateway: RolloutGateway, host: str, port: int, log_level: str = "info") -> None:
    """Serve the gateway with uvicorn until SIGTERM / SIGINT."""
    import uvicorn

    uvicorn.run(
        gateway, host=host, port=port, log_level=log_level, lifespan="on",
        access_log=False, timeout_graceful_shutdown=30,
    )  # fmt: skip


__all__ = [
    "MonotonicClock", "TrafficPolicy", "build_gateway", "plugin_hooks", "registry_versions",
    "run_gateway",
]  # fmt: skip
