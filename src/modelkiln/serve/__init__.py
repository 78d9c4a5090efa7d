"""Serving: one process for causal LMs and encoders behind an OpenAI-compatible API.

Three layers, each testable alone: HTTP (:mod:`.app`, :mod:`.schemas`,
:mod:`.completions`, :mod:`.embedding_routes`, shared route helpers in
:mod:`.routing`, access in :mod:`.access`), scheduling (the generation engine
in :mod:`.generation`, the dynamic batcher in :mod:`.embeddings`, admission
control in :mod:`.admission`) and execution (model backends in
:mod:`.generation.backend` and :mod:`.encoders`, built by :mod:`.loading`).
Plug-ins (monitoring, security, rollouts) join through
:mod:`modelkiln.contract.serving` (:mod:`.hooks` is the server's side).
Importing this package is light: FastAPI, uvicorn and torch load only when a
name below is used.

Example:
    >>> from modelkiln.serve import ModelSpec, ServeConfig, serve
    >>> serve(ServeConfig(models=[ModelSpec(path="runs/x/train/model")], port=8000))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelkiln.serve.app import create_app
    from modelkiln.serve.config import ModelSpec, ServeConfig, load_serve_config
    from modelkiln.serve.server import ModelServer, serve

_EXPORTS = {
    "ModelServer": "modelkiln.serve.server",
    "ModelSpec": "modelkiln.serve.config",
    "ServeConfig": "modelkiln.serve.config",
    "create_app": "modelkiln.serve.app",
    "load_serve_config": "modelkiln.serve.config",
    "serve": "modelkiln.serve.server",
}

__all__ = ["ModelServer", "ModelSpec", "ServeConfig", "create_app", "load_serve_config", "serve"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modelkiln.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
