"""Model loading: what a model directory is, which backend runs it, and its engine.

The kind of a directory is read from its ``config.json``: an architecture
named ``*ForCausalLM`` / ``*LMHeadModel`` is served by the generation engine,
anything else (or a directory holding only an ONNX graph) by the embedding
engine. The backend is ONNX Runtime for a directory with an ONNX graph and no
torch weights (an export from the optimization stage); a Hugging Face directory
(encoder or causal LM) runs on the fastest engine that passes the parity gate on
this machine (:mod:`.autoengine`: torch, or ONNX Runtime fp32 / int8 built at
first start); with that pick switched off a causal LM runs on torch, with a
one-line hint.

Example:
    >>> engine = load_engine(ModelSpec(path="runs/x/train/model"), ServeConfig(), print)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from modelkiln.errors import ServingError
from modelkiln.serve.advice import log_faster_engine_hint
from modelkiln.serve.autoengine import (
    pick_causal_engine,
    pick_encoder_engine,
    pick_switched_off,
)
from modelkiln.serve.config import ModelSpec, ServeConfig, has_torch_weights
from modelkiln.serve.embeddings import BatchPolicy, BatchStats, EmbeddingEngine

log = logging.getLogger("modelkiln.serve")
Kind = Literal["causal_lm", "encoder"]
_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def detect_kind(spec: ModelSpec) -> Kind:
    """The kind of ``spec`` (see the module docstring).

    Raises:
        ServingError: the directory does not exist or holds neither config nor ONNX graph.
    """
    if spec.kind != "auto":
        return spec.kind
    path = Path(spec.path)
    if not path.is_dir():
        raise ServingError(
            f"model directory '{path}' does not exist", hint="pass --model-path of a saved model"
        )
    config = path / "config.json"
    if config.is_file():
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        if any(a.endswith(_LM_SUFFIXES) for a in archs):
            return "causal_lm"
        return "encoder"
    if any(path.glob("*.onnx")):
        return "encoder"
    raise ServingError(
        f"'{path}' holds no config.json and no .onnx file",
        hint="pass a directory written by save_pretrained or by the ONNX export",
    )


def resolve_backend(spec: ModelSpec) -> Literal["torch", "onnx"]:
    """``spec.backend``, with ``auto`` = onnx when the directory has an ONNX graph and no
    torch weights (an export from the optimization stage), else torch."""
    if spec.backend != "auto":
        return spec.backend
    path = Path(spec.path)
    has_onnx = any(path.glob("*.onnx"))
    return "onnx" if has_onnx and not has_torch_weights(path) else "torch"


def load_engine(
    spec: ModelSpec,
    cfg: ServeConfig,
    on_batch: Callable[[BatchStats], None],
    loader: Callable[[Path], Any] | None = None,
    onnx_loader: Callable[[Path, int | None], Any] | None = None,
) -> Any:
    """Build the engine of one model (blocking: call it on a worker thread).

    ``loader``: a plug-in's torch model loader (``ServeHooks.model_loader``), tried first.
    ``onnx_loader``: a plug-in's ONNX session opener (``ServeHooks.onnx_loader``, e.g. an
    encrypted graph decrypted in memory): a session it returns makes the backend onnx.

    Raises:
        ServingError: the model cannot be loaded or its backend is unsupported.
    """
    kind = detect_kind(spec)
    session = _plugged_session(spec, cfg, onnx_loader)
    backend_name = "onnx" if session is not None else resolve_backend(spec)
    if cfg.threads is not None and backend_name == "torch":
        import torch  # only here: an ONNX Runtime model must not pay torch's import (cold start)

        torch.set_num_threads(cfg.threads)
    if kind == "encoder":
        from modelkiln.serve.encoders import OnnxEncoderBackend, TorchEncoderBackend

        backend: Any
        onnx_file = None
        if backend_name == "torch":  # an HF directory: the fastest engine that passes here
            pick = pick_encoder_engine(spec, cfg, hooked_loader=loader is not None)
            backend_name, onnx_file = pick.backend, pick.onnx_file
        if backend_name == "onnx":
            if spec.compile:
                raise ServingError(
                    f"compile: true needs the torch backend; '{spec.path}' runs on onnx",
                    hint="set backend: torch, or drop compile",
                )
            backend = (
                OnnxEncoderBackend.from_session(spec.path, session)
                if session is not None
                else OnnxEncoderBackend.from_path(spec.path, cfg.threads, onnx_file)
            )
        else:
            backend = TorchEncoderBackend.from_path(
                spec.path, spec.precision, compile=spec.compile, loader=loader
            )
        e = cfg.embedding
        policy = BatchPolicy(
            e.max_batch_tokens, e.max_batch_size, e.max_wait_ms / 1000, tuple(e.buckets)
        )
        return EmbeddingEngine(backend, policy, model_name=spec.served_name, on_batch=on_batch)
    if spec.compile:
        raise ServingError(
            f"compile: true is not supported for the causal LM '{spec.path}'",
            hint="the generation engine's KV cache changes shape every step, which makes "
            "torch.compile recompile; set compile only on encoder models",
        )
    try:
        from modelkiln.serve.generation.engine import ContinuousBatchingEngine
    except ImportError as exc:  # the engine lives in its own package; guard partial installs
        raise ServingError(f"the generation engine is unavailable: {exc}") from exc
    if backend_name == "torch" and session is None:  # an HF directory: the fastest engine here
        pick = pick_causal_engine(spec, cfg, hooked_loader=loader is not None)
        if pick.onnx_file is not None:
            from modelkiln.onnxrt import cpu_session

            try:
                session = cpu_session(pick.onnx_file, cfg.threads)
                backend_name = "onnx"
            except Exception as exc:  # boundary: a damaged cached graph -> keep torch
                log.warning("cannot open %s (%s): serving on torch", pick.onnx_file, exc)
        elif pick_switched_off():  # say once how to get the faster engine
            log_faster_engine_hint(spec, kind, backend_name)
    return ContinuousBatchingEngine.from_path(
        spec.path,
        adapter=spec.adapter,
        precision=spec.precision,
        max_num_seqs=cfg.generation.max_num_seqs,
        max_batched_tokens=cfg.generation.max_batched_tokens,
        threads=cfg.threads,
        model_name=spec.served_name,
        backend=backend_name,
        loader=loader,
        onnx_session=session,
    )


def _plugged_session(
    spec: ModelSpec, cfg: ServeConfig, onnx_loader: Callable[[Path, int | None], Any] | None
) -> Any:
    """The ONNX Runtime session a plug-in opens for ``spec`` (None: the default reader's)."""
    if onnx_loader is None or spec.backend == "torch":
        return None
    return onnx_loader(Path(spec.path), cfg.threads)
