"""Azure ML scoring script: modelkiln's own server engine behind ``init()`` / ``run()``.

Azure ML's inference server imports this file (copied as ``score/score.py``), calls
``init()`` once with ``$AZUREML_MODEL_DIR`` set to the mounted model, then ``run()``
with each request body as a string. ``init()`` starts modelkiln's OpenAI-compatible
server on loopback (the same engine, batching and limits as ``kiln serve``); ``run()``
forwards the body to the matching route and returns its JSON:

- ``{"prompt": ...}`` -> /v1/completions, ``{"messages": [...]}`` -> /v1/chat/completions,
- ``{"input": ...}`` -> /v1/embeddings.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_server: Any = None
_model: str = ""


def _model_dir() -> Path:
    """The model directory: ``$AZUREML_MODEL_DIR`` / ``$MODELKILN_MODEL_SUBDIR``, or the
    single sub-directory Azure mounts the registered model's folder as."""
    root = Path(os.environ.get("AZUREML_MODEL_DIR", "."))
    sub = os.environ.get("MODELKILN_MODEL_SUBDIR", "")
    if sub:
        return root / sub
    if (root / "config.json").exists() or any(root.glob("*.onnx")):
        return root
    dirs = [p for p in root.iterdir() if p.is_dir()]
    return dirs[0] if len(dirs) == 1 else root


def init() -> None:
    """Load the model and start the engine (Azure calls this once per worker)."""
    global _server, _model
    from modelkiln.serve import ModelServer

    path = _model_dir()
    _model = path.resolve().name
    _server = ModelServer(path, host="127.0.0.1", port=0)
    _server.start(timeout=float(os.environ.get("MODELKILN_READY_TIMEOUT_S", "600")))


def _route(body: dict[str, Any]) -> str:
    if "messages" in body:
        return "/v1/chat/completions"
    if "input" in body:
        return "/v1/embeddings"
    return "/v1/completions"


def run(raw_data: str | bytes) -> dict[str, Any]:
    """Score one request body (JSON text); errors come back as ``{"error": ...}``."""
    try:
        body = json.loads(raw_data)
    except ValueError as exc:
        return {"error": {"message": f"request body is not JSON: {exc}", "code": 400}}
    if not isinstance(body, dict):
        return {"error": {"message": "request body must be a JSON object", "code": 400}}
    if body.get("stream"):
        return {"error": {"message": "streaming is not supported by this endpoint", "code": 400}}
    body.setdefault("model", _model)
    request = urllib.request.Request(
        _server.url + _route(body),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}")
        return {"error": detail.get("error", detail), "status": exc.code}


def shutdown() -> None:
    """Drain and stop the engine (tests; Azure ends the process)."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None
