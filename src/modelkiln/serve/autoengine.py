"""Fast by default: the encoder engine ``kiln serve --model-path <HF dir>`` picks on this machine.

A Hugging Face encoder directory (torch weights, ``backend: auto``) is served by
the fastest of three engines that passes the parity gate here:

- torch at the precision ``auto`` picks (bf16 only where it is fast and accurate);
- ONNX Runtime fp32 (the graph exported here, with every ORT graph optimization);
- ONNX Runtime int8 (dynamic quantization of that graph).

The first start exports and quantizes the graphs (tens of seconds, with a progress
line), checks each engine's embeddings against torch fp32 on probe inputs (min
cosine >= :data:`MIN_COSINE`), times each at one full batch (16 x 128 tokens, the
default token budget) and logs the decision with its figures. Graphs are cached
under ``$MODELKILN_CACHE_DIR/serve-engines/<model hash>/``, the decision per
machine beside them, so later starts only hash the weights.

Why it pays on a CPU server beyond the raw speed: an ONNX Runtime forward is one
call that releases the GIL for its whole length, while a torch forward takes the
GIL back between operators and then waits for the event loop (issue 18 measured
the served torch engine at 0.58x of its offline speed on class B).

Pin an engine with ``backend: torch`` / ``backend: onnx`` (or ``--backend``);
``MODELKILN_SERVE_PICK=0`` turns the choice off; a variant directory written by
``kiln optimize`` is served as it is (that stage chose it on an evaluation set).
Models with less than
:data:`MIN_WEIGHT_BYTES` of weights are served on torch: a forward of such a model
is mostly per-call overhead, and the one-time export would cost more than it saves.

Example:
    >>> pick = pick_encoder_engine(ModelSpec(path=minilm_dir), cfg)
    >>> pick.backend, pick.onnx_file
    ('onnx', PosixPath('~/.cache/modelkiln/serve-engines/3f2a.../model-int8.onnx'))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelkiln.contract import VARIANT_JSON
from modelkiln.hardware import cache_dir, cpu_info
from modelkiln.serve.config import ModelSpec, ServeConfig, has_torch_weights

log = logging.getLogger("modelkiln.serve")

#: Environment variable: ``0`` / ``off`` serves HF encoder directories on torch (no choice).
PICK_ENV = "MODELKILN_SERVE_PICK"
#: Weights below this size stay on torch (see the module docstring).
MIN_WEIGHT_BYTES = 16 * 2**20
#: Parity gate: every probe embedding's cosine with torch fp32's at least this.
MIN_COSINE = 0.99
#: A non-torch engine must be this much faster to replace torch (noise margin).
MIN_GAIN = 1.05
_BATCH = (16, 128)  # inputs x tokens of the timed batch (the default 2048-token budget)


@dataclass(frozen=True)
class Pick:
    """The engine an encoder directory is served by, and why."""

    backend: Literal["torch", "onnx"]
    onnx_file: Path | None
    reason: str


def _weights(path: Path) -> list[Path]:
    return sorted([*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")])


def skip_reason(spec: ModelSpec, hooked_loader: bool) -> str | None:
    """Why ``spec`` is served as asked (no choice), or None when the engine is picked here."""
    path = Path(spec.path)
    if os.environ.get(PICK_ENV, "1").lower() in ("0", "off", "false", "no"):
        return f"${PICK_ENV} is off"
    if spec.backend != "auto" or spec.compile:
        return "the backend is pinned"
    if hooked_loader:
        return "a plug-in loads the weights"
    if not has_torch_weights(path):
        return "no torch weights"
    if (path / VARIANT_JSON).is_file():
        return "an optimized variant (kiln optimize already chose it)"
    if sum(f.stat().st_size for f in _weights(path)) < MIN_WEIGHT_BYTES:
        return "small model (per-call overhead dominates)"
    return None


def model_hash(path: Path) -> str:
    """sha256 of the config, tokenizer and weight files (what changes the exported graph)."""
    digest = hashlib.sha256()
    names = ["config.json", "tokenizer.json", "sentence_bert_config.json"]
    files = [path / n for n in names if (path / n).is_file()] + _weights(path)
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def _machine() -> str:
    import onnxruntime

    info = cpu_info()
    flags = ",".join(sorted(f for f, v in info.flags.items() if v))
    raw = f"{info.model}|{flags}|ort {onnxruntime.__version__}|{os.cpu_count()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def pick_encoder_engine(spec: ModelSpec, cfg: ServeConfig, hooked_loader: bool = False) -> Pick:
    """The fastest engine for the encoder ``spec`` here (built, gated and timed once, cached).

    Never raises for a failed export or quantization: the server then runs torch and
    logs why (the pick is an optimization, not a requirement).
    """
    skip = skip_reason(spec, hooked_loader)
    if skip is not None:
        return Pick("torch", None, skip)
    path = Path(spec.path)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return Pick("torch", None, "onnxruntime is not installed (the onnx extra)")
    where = cache_dir() / "serve-engines" / model_hash(path)[:20]
    decision_file = where / f"decision-{_machine()}.json"
    if decision_file.is_file():
        data = json.loads(decision_file.read_text(encoding="utf-8"))
        pick = _from_decision(data, where)
        log.info("engine of %s: %s (decided at first start; %s)", spec.served_name,
                 data["engine"], pick.reason)  # fmt: skip
        return pick
    log.info(
        "first start of %s: building its ONNX engines and timing them once (about a minute; "
        "cached in %s)", spec.served_name, where,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        data = _decide(spec, cfg, where)
    except Exception as exc:  # boundary: any export / quantization failure -> keep torch
        log.warning("cannot build the ONNX engines of %s (%s): serving on torch",
                    spec.served_name, exc)  # fmt: skip
        return Pick("torch", None, f"ONNX build failed: {exc}")
    data["seconds"] = round(time.monotonic() - t0, 1)
    scratch = decision_file.with_name(f"{decision_file.name}.{os.getpid()}.partial")
    scratch.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(scratch, decision_file)  # another worker never reads a half-written decision
    pick = _from_decision(data, where)
    log.info("engine of %s: %s (%s; took %.0f s)", spec.served_name, data["engine"],
             pick.reason, data["seconds"])  # fmt: skip
    return pick


def _from_decision(data: dict[str, Any], where: Path) -> Pick:
    figures = ", ".join(
        f"{name} {c['per_s']:.0f}/s cos {c['min_cosine']:.4f}"
        for name, c in data["candidates"].items()
    )
    reason = f"sentences/s at 16x128 and min cosine vs torch fp32: {figures}"
    file = data.get("file")
    if not file or not (where / file).is_file():
        return Pick("torch", None, reason)
    return Pick("onnx", where / data["file"], reason)


def _decide(spec: ModelSpec, cfg: ServeConfig, where: Path) -> dict[str, Any]:
    """Export, quantize, gate and time; the decision as JSON-ready data."""
    import numpy as np

    from modelkiln.serve.encoders import OnnxEncoderBackend, TorchEncoderBackend
    from modelkiln.serve.enginebuild import export_encoder, quantize_int8, reference_model

    path = Path(spec.path)
    where.mkdir(parents=True, exist_ok=True)
    reference = reference_model(path)
    fp32_file, int8_file = where / "model.onnx", where / "model-int8.onnx"
    if not fp32_file.is_file():
        export_encoder(reference, fp32_file)
    if not int8_file.is_file():
        quantize_int8(fp32_file, int8_file)
    torch_backend = TorchEncoderBackend.from_path(path, spec.precision)
    probes, batch = _inputs(torch_backend.tokenizer, min(_BATCH[1], torch_backend.max_length))
    ref_backend = TorchEncoderBackend(reference, torch_backend.tokenizer, torch_backend.pooling)
    want = ref_backend.encode(probes)
    dtype = str(torch_backend.model.dtype).removeprefix("torch.")
    torch_name = {"float32": "torch-fp32", "bfloat16": "torch-bf16"}.get(dtype, dtype)
    candidates: dict[str, Any] = {
        torch_name: (torch_backend, None),
        "onnx-fp32": (OnnxEncoderBackend.from_path(path, cfg.threads, fp32_file), "model.onnx"),
        "onnx-int8": (
            OnnxEncoderBackend.from_path(path, cfg.threads, int8_file),
            "model-int8.onnx",
        ),
    }
    backends = {name: b for name, (b, _) in candidates.items()}
    speeds = _speeds(backends, batch)
    rows: dict[str, dict[str, Any]] = {}
    for name, backend in backends.items():
        got = backend.encode(probes)
        cos = np.sum(got * want, 1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12
        )
        rows[name] = {"per_s": speeds[name], "min_cosine": float(cos.min())}
    passing = [n for n, r in rows.items() if r["min_cosine"] >= MIN_COSINE]
    best = max(passing, key=lambda n: rows[n]["per_s"], default=torch_name)
    if best != torch_name and rows[best]["per_s"] < MIN_GAIN * rows[torch_name]["per_s"]:
        best = torch_name
    file = candidates[best][1]
    return {"engine": best, "file": file, "candidates": rows, "gate_min_cosine": MIN_COSINE}


def _inputs(tokenizer: Any, width: int) -> tuple[list[list[int]], list[list[int]]]:
    """Probe texts of mixed lengths (the parity gate) and one full batch (the timing).

    At most ``width`` tokens each (128, or the model's limit when shorter).

    Words of the tokenizer's own vocabulary, seeded: text as clients send it, with the
    special tokens, rather than random ids (quantization error is larger on ids no
    text produces, so random ids would gate on inputs that never come).
    """
    import random

    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    words = words or ["hello", "world"]
    rng = random.Random(0)

    def texts(lengths: list[int]) -> list[list[int]]:
        batch = [" ".join(rng.choices(words, k=min(n, width - 2))) for n in lengths]
        return [list(ids)[:width] for ids in tokenizer(batch)["input_ids"]]

    return texts([2, 7, 15, 31, 62, 100, 126, 126]), texts([width - 2] * _BATCH[0])


def _speeds(backends: dict[str, Any], batch: list[list[int]], rounds: int = 5) -> dict[str, float]:
    """Sentences per second of each backend at ``batch``: best call of ``rounds``, interleaved.

    Interleaved so that a burst of load from elsewhere on the machine hits every
    candidate alike rather than the one being timed at that moment.
    """
    best = dict.fromkeys(backends, float("inf"))
    for backend in backends.values():
        backend.encode(batch)  # warm-up
    for _ in range(rounds):
        for name, backend in backends.items():
            t0 = time.perf_counter()
            backend.encode(batch)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(batch) / seconds for name, seconds in best.items()}
