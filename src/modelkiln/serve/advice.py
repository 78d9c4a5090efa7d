"""One-line advice at load time: how to get the faster engine the user did not ask for.

``kiln serve --model-path <HF dir>`` picks a causal LM's engine at first start
(:mod:`modelkiln.serve.autoengine`: the ONNX Runtime KV-cache graph, fp32 or int8,
when it passes the gate and decodes faster). Where that pick did not run
(``MODELKILN_SERVE_PICK=0``) the model stays on torch, and on CPUs the ONNX
engine usually decodes faster (issue 18 measured 962 tok/s for the ONNX int8
variant of a 27.6M GPT-2 against 443 for HF ``generate`` fp32), so the server
says once how to get it."""

from __future__ import annotations

import logging
from pathlib import Path

from modelkiln.serve.config import ModelSpec

log = logging.getLogger("modelkiln.serve")


def faster_engine_hint(spec: ModelSpec, kind: str, backend: str) -> str | None:
    """The advice for a causal LM that ``auto`` put on torch, else None."""
    if kind != "causal_lm" or backend != "torch" or spec.backend != "auto":
        return None
    path = Path(spec.path)
    return (
        f"serving {spec.served_name!r} on torch; on CPU the ONNX Runtime engine is usually "
        f"faster: add --backend onnx (exports the KV-cache graph at load), or build the "
        f"int8 variant once with: kiln optimize model {path} --data <data artifact> "
        f"--out <dir>, then serve <dir>'s promoted variant"
    )


def log_faster_engine_hint(spec: ModelSpec, kind: str, backend: str) -> None:
    """Log :func:`faster_engine_hint` (once per model, at load) when there is one."""
    hint = faster_engine_hint(spec, kind, backend)
    if hint is not None:
        log.info(hint)
