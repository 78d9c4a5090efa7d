"""Admin routes: load and unload PEFT LoRA adapters of a running causal LM.

``POST /admin/adapters`` ``{"name", "path", "model"?}`` loads the adapter saved
in ``path`` (a ``PeftModel.save_pretrained`` directory on the server's disk)
into the causal LM ``model`` (default: the only / first one); clients then
select it with ``"model": "<model>:<name>"`` (listed by ``/v1/models``).
``DELETE /admin/adapters/{id}`` unloads it (``id``: ``model:name`` or just
``name`` when one model has it); its unfinished requests are cancelled and
later requests naming it get 404. ``GET /admin/adapters`` lists them.

Auth: ``Authorization: Bearer <admin key>`` with a key from ``admin_keys`` /
``$MODELKILN_ADMIN_KEYS`` (separate from the API keys, which do not open these
routes). With no admin key configured the routes answer 403. With a plugged
authenticator (:class:`~modelkiln.contract.serving.ServeHooks`), the caller's
principal needs the ``admin`` scope instead. Anyone holding an
admin key can make the server read any adapter directory it can access.

Example:
    >>> httpx.post(url + "/admin/adapters", json={"name": "sql", "path": "adapters/sql"},
    ...            headers={"Authorization": "Bearer admin-secret"})
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from modelkiln.contract.serving import RequestRejected
from modelkiln.errors import KilnError
from modelkiln.serve.access import require_admin
from modelkiln.serve.http_errors import APIError, bad_request, unavailable
from modelkiln.serve.state import ServedModel, ServerState

router = APIRouter(prefix="/admin", tags=["admin"])


class AdapterLoad(BaseModel):
    """Body of ``POST /admin/adapters``."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=64,
        description="Name of the adapter; clients select it as 'model:name'.",
    )
    path: str = Field(min_length=1, description="Adapter directory on the server's disk.")
    model: str | None = Field(None, description="Causal LM to attach it to (default: the first).")


class AdapterInfo(BaseModel):
    """One loaded adapter."""

    id: str = Field(description="What clients pass as 'model'.")
    model: str
    name: str
    path: str


class AdapterList(BaseModel):
    """``GET /admin/adapters``."""

    data: list[AdapterInfo]


class AdapterUnloaded(BaseModel):
    """Answer of ``DELETE /admin/adapters/{id}``."""

    id: str
    deleted: bool = True
    cancelled_requests: int = Field(description="Unfinished requests that used it.")


def _state(request: Request) -> ServerState:
    """The app's state, once the caller proved it may administer the server."""
    state: ServerState = request.app.state.kiln
    try:
        require_admin(request, state.admin_keys, plugged=state.hooks.authenticator is not None)
    except RequestRejected as exc:
        if exc.status == 401:
            state.metrics.rejections.labels("unauthorized").inc()
        raise
    if state.draining:
        raise unavailable("the server is shutting down", "draining")
    if not state.ready:
        raise unavailable("the models are still loading", "not_ready")
    return state


def _lm(state: ServerState, name: str | None) -> ServedModel:
    lms = [m for m in state.models.values() if m.kind == "causal_lm"]
    if name is None:
        if not lms:
            raise bad_request("this server serves no causal LM to attach an adapter to")
        return lms[0]
    served = state.models.get(name)
    if served is None or served.kind != "causal_lm":
        raise APIError(
            404,
            f"no causal LM named {name!r}; causal LMs: {', '.join(m.name for m in lms) or 'none'}",
            code="model_not_found",
            param="model",
        )
    return served


def _infos(state: ServerState) -> list[AdapterInfo]:
    out = []
    for served in state.models.values():
        for name, path in sorted(getattr(served.engine, "adapters", {}).items()):
            out.append(AdapterInfo(id=f"{served.name}:{name}", model=served.name, name=name,
                                   path=path))  # fmt: skip
    return out


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(request: Request) -> AdapterList:
    """The LoRA adapters loaded at run time."""
    return AdapterList(data=_infos(_state(request)))


@router.post("/adapters", response_model=AdapterInfo, status_code=201)
async def load_adapter(request: Request, body: AdapterLoad) -> AdapterInfo:
    """Load a PEFT LoRA adapter into a causal LM (409 if the name is taken)."""
    state = _state(request)
    served = _lm(state, body.model)
    if not hasattr(served.engine, "load_adapter"):
        raise bad_request(f"the engine of {served.name!r} cannot load adapters", param="model")
    if body.name in served.engine.adapters:
        raise APIError(
            409,
            f"an adapter named {body.name!r} is already loaded into {served.name!r}",
            code="adapter_exists",
            param="name",
        )
    path = Path(body.path).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise bad_request(
            f"'{body.path}' holds no adapter_config.json (not a saved PEFT adapter)", param="path"
        )
    try:
        await asyncio.to_thread(state.check_model, path)  # plug-ins' checks (signatures ...)
        await served.engine.load_adapter(body.name, path)
    except KilnError as exc:
        raise bad_request(str(exc), param="path") from exc
    key = (served.name, body.name)
    state.adapter_loads[key] = state.adapter_loads.get(key, 0) + 1
    return AdapterInfo(
        id=f"{served.name}:{body.name}", model=served.name, name=body.name, path=str(path)
    )


@router.delete("/adapters/{adapter_id}", response_model=AdapterUnloaded)
async def unload_adapter(request: Request, adapter_id: str) -> AdapterUnloaded:
    """Unload an adapter (``model:name``, or ``name`` alone when unambiguous)."""
    state = _state(request)
    matches = [i for i in _infos(state) if adapter_id in (i.id, i.name)]
    if len(matches) != 1:
        loaded = ", ".join(i.id for i in _infos(state)) or "none"
        if matches:
            raise bad_request(
                f"adapter {adapter_id!r} is ambiguous; pass one of {loaded}", param="adapter_id"
            )
        raise APIError(
            404,
            f"no adapter {adapter_id!r} is loaded; loaded: {loaded}",
            code="adapter_not_found",
        )
    info = matches[0]
    cancelled = await state.models[info.model].engine.unload_adapter(info.name)
    return AdapterUnloaded(id=info.id, cancelled_requests=cancelled)
