"""``/admin/rollout`` routes of the gateway (admin key required):

- ``GET  /admin/rollout``                     every model: versions, split, rollout state
- ``GET  /admin/rollout/{model}``             one model, with its last decisions
- ``POST /admin/rollout/{model}/start``       ``{"candidate": "2", "strategy": "canary", ...}``
- ``POST /admin/rollout/{model}/promote|rollback|abort``
- ``POST /admin/rollout/{model}/versions``       ``{"version": "4"}``: add a registry version
  to the running gateway (an adapter version on a base model already loaded)
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from modelkiln.errors import KilnError
from modelkiln.rollout.gateway_http import json_response, read_body
from modelkiln.rollout.spec import RolloutSpec

if TYPE_CHECKING:
    from modelkiln.rollout.gateway import RolloutGateway


def _authorized(keys: list[str], headers: list[tuple[bytes, bytes]]) -> bool:
    auth = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    digest = hashlib.sha256(token.strip().encode()).digest()
    ok = False
    for key in keys:  # every key compared: timing says nothing about which matched
        ok |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return ok


def _actor(headers: list[tuple[bytes, bytes]]) -> str:
    """Who acts, for the audit log: the admin key's id (first 12 hex of its sha256, as
    ``kiln keys`` names keys), never the key."""
    token = dict(headers).get(b"authorization", b"").decode("latin-1").partition(" ")[2]
    return "admin-key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:12]


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def model_view(gw: RolloutGateway, model: str, decisions: int = 0) -> dict[str, Any]:
    """What the admin API says about one model."""
    state, recent = gw.controller.snapshot(model, decisions)
    policy = gw.policies[model]
    out: dict[str, Any] = {
        "model": model, "versions": gw.versions[model], "policy": policy.model_dump(),
        "rollout": None if state is None else json.loads(state.model_dump_json(exclude={"tests"})),
    }  # fmt: skip
    if decisions:
        out["decisions"] = [json.loads(d.model_dump_json()) for d in recent]
    return out


def models_json(gw: RolloutGateway, body: bytes) -> bytes:
    """The server's ``/v1/models`` answer with each logical model, its versions and split."""
    data = json.loads(body)
    for model, versions in gw.versions.items():
        state = gw.controller.status(model)
        policy = gw.policies[model]
        rollout = (
            None
            if state is None
            else {"status": state.status, "candidate": state.spec.candidate, "stage": state.stage}
        )
        data.setdefault("data", []).append(
            {
                "id": model, "object": "model", "owned_by": "modelkiln", "versions": versions,
                "split": policy.weights, "shadow": policy.shadow,
                "shadow_percent": policy.shadow_percent, "mirror_percent": policy.mirror_percent,
                "rollout": rollout,
            }
        )  # fmt: skip
    return json.dumps(data).encode()


async def handle_admin(gw: RolloutGateway, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve one ``/admin/rollout`` request."""
    if not gw.admin_keys:
        await json_response(
            send, 403, _error("admin routes are off: no admin key configured", "admin_disabled")
        )
        return
    if not _authorized(gw.admin_keys, scope["headers"]):
        await json_response(
            send,
            401,
            _error(
                "a valid admin key is required (Authorization: Bearer KEY)", "invalid_admin_key"
            ),
        )
        return
    parts = [p for p in scope["path"].split("/") if p][2:]
    method = scope["method"]
    if not parts and method == "GET":
        await json_response(send, 200, {"models": [model_view(gw, m) for m in gw.versions]})
        return
    model = parts[0] if parts else ""
    if model not in gw.versions:
        await json_response(
            send, 404, _error(f"model {model!r} is not served by this gateway", "model_not_found")
        )
        return
    action = parts[1] if len(parts) > 1 else ""
    if method == "GET" and not action:
        await json_response(send, 200, model_view(gw, model, decisions=20))
        return
    if method != "POST" or action not in ("start", "promote", "rollback", "abort", "versions"):
        await json_response(send, 404, _error(f"no route {method} {scope['path']}", "not_found"))
        return
    body = await read_body(receive)
    try:
        with gw.controller.acting(_actor(scope["headers"])):
            await _act(gw, model, action, json.loads(body or b"{}"))
        if action != "versions":  # operator decisions reach Prometheus like the controller's
            _, recent = gw.controller.snapshot(model, 1)
            for decision in recent:
                gw.metrics.decision(decision)
    except (KilnError, ValidationError, ValueError) as exc:
        conflict = any(w in str(exc) for w in ("already", "no active rollout"))
        await json_response(send, 409 if conflict else 400, _error(str(exc), "rollout_refused"))
        return
    await json_response(send, 200, model_view(gw, model, decisions=5))


async def _act(gw: RolloutGateway, model: str, action: str, body: dict[str, Any]) -> None:
    ctl = gw.controller
    reason = str(body.get("reason") or f"{action} by an operator (admin API)")
    if action == "start":
        baseline = max(gw.policies[model].weights.items(), key=lambda kv: kv[1])[0]
        spec = RolloutSpec.model_validate({"model": model, "baseline": baseline, **body})
        if spec.candidate not in gw.versions[model]:
            raise KilnError(
                f"{model}: version {spec.candidate!r} is not loaded (loaded: {gw.versions[model]})",
                hint="restart the gateway with that version in --versions",
            )
        ctl.start(spec)
    elif action == "versions":
        from modelkiln.rollout.gateway_adapters import add_version

        await add_version(gw, model, str(body.get("version") or ""))
    elif action == "promote":
        ctl.promote(model, reason)
    elif action == "rollback":
        ctl.rollback(model, reason)
    else:
        ctl.abort(model, reason)
