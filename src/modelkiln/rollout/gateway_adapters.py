"""LoRA adapters as canary units: adapter versions of one model run as *runtime* adapters
on one shared base model (no merged copy per version), and the gateway rewrites the
request's ``model`` to ``<base>:<adapter>``.

Once the server's lifespan has started, :func:`load_adapters` waits for the inner app's
``/ready`` and loads each adapter through the server's own ``POST /admin/adapters`` (in
process, with an internal admin key), so the server's checks (signatures, trust policy)
and audit apply as for any runtime adapter. Until every adapter is loaded the gateway's
``/ready`` answers 503 (:func:`ready_error`), so no request reaches a missing adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ConfigError, ServingError
from modelkiln.rollout.gateway_http import call_app
from modelkiln.rollout.plan import RuntimeAdapters, version_fields

if TYPE_CHECKING:
    from modelkiln.rollout.gateway import RolloutGateway

log = logging.getLogger(__name__)


async def _load_one(gw: RolloutGateway, plan: RuntimeAdapters, version: str, base: str,
                    path: str) -> None:  # fmt: skip
    auth = [(b"authorization", f"Bearer {plan.admin_key}".encode())]
    body = {"name": f"v{version}", "path": path, "model": base}
    status, answer = await call_app(gw.app, "POST", "/admin/adapters", body, auth)
    if status != 201:
        raise ServingError(
            f"the server refused {path} as {base}:v{version}: {status} {answer[:300]!r}",
            hint="check that the adapter was trained on the loaded base model",
        )
    plan.loaded.append(f"{base}:v{version}")


async def add_version(gw: RolloutGateway, model: str, version: str) -> None:
    """Add a registry version to the running gateway (admin API): an adapter version is
    loaded as a runtime adapter on its base model, which must be loaded already.

    Raises:
        ConfigError: no registry, version already loaded, not an adapter, base not loaded.
        ArtifactError: the registry has no such version, or its files changed.
        ServingError: the server refused the adapter.
    """
    if not version:
        raise ConfigError('name the version to add: {"version": "4"}')
    if version in gw.versions[model]:
        raise ConfigError(f"{model}: version {version!r} is already loaded")
    if gw.resolve is None or gw.adapters is None:
        raise ConfigError(
            "this gateway cannot add versions: it has no registry or no runtime base model",
            hint="restart it with the version in --versions",
        )
    folder = await asyncio.to_thread(gw.resolve, model, version)  # re-hashes the files
    fields = version_fields(folder)
    base = gw.adapters.bases.get(str(Path(fields["path"]).resolve()))
    if "adapter" not in fields or base is None:
        what = "not a PEFT adapter" if "adapter" not in fields else "on a base not loaded"
        raise ConfigError(
            f"{model}@{version} is {what}: only adapters of a loaded base model can be added",
            hint="the server loads full models at start: restart with the version in --versions",
        )
    await _load_one(gw, gw.adapters, version, base, str(fields["adapter"]))
    gw.adapters.adapters[(model, version)] = (base, str(fields["adapter"]))
    gw.versions[model] = [*gw.versions[model], version]
    if gw.controller.audit is not None:
        gw.controller.audit.write(
            "rollout.action", actor=gw.controller.actor, rollout=model, action="add-version",
            version=version, target=f"{base}:v{version}",
        )  # fmt: skip


async def load_adapters(gw: RolloutGateway, plan: RuntimeAdapters) -> None:
    """Wait for the server's models, then load every adapter version (once)."""
    try:
        end = time.monotonic() + plan.timeout_s
        while (await call_app(gw.app, "GET", "/ready"))[0] != 200:
            if time.monotonic() > end:
                raise TimeoutError(f"the models were not ready within {plan.timeout_s:g} s")
            await asyncio.sleep(0.2)
        for (_model, version), (base, path) in list(plan.adapters.items()):
            await _load_one(gw, plan, version, base, path)
    except Exception as exc:  # the reason goes to /ready, where a deployment looks
        plan.error = f"runtime adapters not loaded: {exc}"
        log.error("%s", plan.error)
    finally:
        plan.pending = False


def ready_error(plan: RuntimeAdapters | None) -> str:
    """Why the gateway is not ready because of its adapters ('' when it is)."""
    if plan is None:
        return ""
    if plan.pending:
        return "loading the runtime adapters"
    return plan.error


def ready_body(message: str) -> bytes:
    """The 503 body of ``/ready`` while adapters are missing."""
    return json.dumps(
        {"error": {"message": message, "type": "service_unavailable", "code": "not_ready"}}
    ).encode()


def is_startup_complete(msg: dict[str, Any]) -> bool:
    """Whether a lifespan message says the app has started."""
    return msg.get("type") == "lifespan.startup.complete"
