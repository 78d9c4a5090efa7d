"""Put the gateway in front of a real model server: one served model per version,
the controller on the real clock, the registry updated when a rollout promotes.

Uses only the serve stage's public API (``modelkiln.serve.create_app``,
``ServeConfig``, ``ModelSpec``), imported when a gateway is built.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.rollout.controller import Controller
from modelkiln.rollout.faults import FaultInjector
from modelkiln.rollout.gateway import RolloutGateway, served_name
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


def version_fields(folder: Path) -> dict[str, Any]:
    """``ModelSpec`` path fields of one version: a PEFT adapter version is served as its base
    model with the adapter merged at load (its own served model, so it can be a canary unit).

    Raises:
        ConfigError: an adapter whose base model is not a local folder.
    """
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        return {"path": folder}
    base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(
            f"{folder}: adapter base model {base!r} is not a local folder",
            hint="register adapters trained on a local base model (nothing is downloaded)",
        )
    return {"path": Path(base), "adapter": folder}


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
        tick_s: seconds between the controller's due-check polls.
    """
    from modelkiln.serve import ModelSpec, ServeConfig, create_app

    if serving not in folders:
        raise ConfigError(f"serving version {serving!r} is not among {sorted(folders)}")
    specs = [
        ModelSpec(
            **version_fields(p), name=served_name(model, v), version=v, **(model_options or {})
        )
        for v, p in folders.items()
    ]
    cfg = ServeConfig.model_validate(
        {
            **(serve_config or {}),
            "models": [s.model_dump() for s in specs],
            "admin_keys": admin_keys,
        }
    )
    recorder = Recorder()

    def on_finish(state: RolloutState) -> None:
        if registry is not None and state.status == "promoted":
            registry.promote(model, int(state.spec.candidate), "production")

    def factory(apply: Any) -> Controller:
        return Controller(
            StateStore(state_dir), MonotonicClock(), recorder, apply=apply, on_finish=on_finish
        )

    return RolloutGateway(
        create_app(cfg),
        versions={model: list(folders)},
        serving={model: serving},
        controller_factory=factory,
        recorder=recorder,
        admin_keys=admin_keys,
        faults={(model, v): f for v, f in (faults or {}).items()},
        tick_s=tick_s,
    )


def run_gateway(gateway: RolloutGateway, host: str, port: int, log_level: str = "info") -> None:
    """Serve the gateway with uvicorn until SIGTERM / SIGINT."""
    import uvicorn

    uvicorn.run(
        gateway, host=host, port=port, log_level=log_level, lifespan="on",
        access_log=False, timeout_graceful_shutdown=30,
    )  # fmt: skip


__all__ = ["MonotonicClock", "TrafficPolicy", "build_gateway", "registry_versions", "run_gateway"]
