"""Fast by default: the engine ``kiln serve --model-path <HF dir>`` picks on this machine.

A Hugging Face directory (torch weights, ``backend: auto``) is served by the
fastest engine that passes a quality gate against torch fp32 here, measured at
run time on this CPU (no per-class rule):

- torch at the precision ``auto`` picks (bf16 only where it is fast and accurate);
- ONNX Runtime fp32 (the graph exported here, with every ORT graph optimization);
- ONNX Runtime int8 (dynamic quantization of that graph).

**Encoders** (:func:`pick_encoder_engine`): the graph maps tokens to the last
hidden state. The gate: every probe embedding's cosine with torch fp32's at
least :data:`MIN_COSINE`; the timing: one full batch (16 x 128 tokens, the
default token budget).

**Causal LMs** (:func:`pick_causal_engine`): the graph is the KV-cache graph of
:mod:`modelkiln.kvgraph` (what the optimize stage ships as ``model_kv.onnx``),
run by the generation engine's ONNX backend. The gate is teacher-forced greedy
decoding of :data:`_PROBES` probe prompts (prefilled together, left-padded, as
the server batches them) for :data:`_STEPS` steps, each engine fed torch fp32's
greedy tokens, compared position by position with torch fp32's next-token
distribution (:func:`generation_gate`):

- mean KL(torch fp32 || engine) <= :data:`MAX_MEAN_KL` nats per token: the
  cross-entropy, so the perplexity, of sampled text rises by at most about
  ``e^0.005 - 1 = 0.5 %``. Where that sits (class B, 2026-12-02): ONNX fp32 ~0,
  int8 dynamic 1e-4 to 2e-4 (the 27.6M GPT-2 of the peers benchmark and three
  tiny GPT-2s with peaked distributions), 4-bit block-wise weights (ORT
  MatMulNBits, blocks of 32 / 128) 0.007 to 0.010 on the tiny ones: the gate
  admits 8-bit and rejects 4-bit-grade error (near-lossless on purpose, as the
  encoder gate is);
- greedy agreement >= :data:`MIN_AGREE`: the engine's greedy token is torch
  fp32's, or one torch fp32 scores within :data:`TIE_NATS` of its own best (a
  near-tie, where fp32 itself flips between runs of different batch shapes).

The timing is decode throughput at the server's batch (``max_num_seqs`` rows,
32 by default, 32-token prompts), interleaved rounds, best of each.

The first start exports and quantizes the graphs (tens of seconds, with a progress
line), gates and times each engine and logs the decision with its figures in one
line. Graphs are cached under ``$MODELKILN_CACHE_DIR/serve-engines/<model hash>/``,
the decision per machine beside them, so later starts only hash the weights.

Why it pays on a CPU server beyond the raw speed: an ONNX Runtime forward is one
call that releases the GIL for its whole length, while a torch forward takes the
GIL back between operators and then waits for the event loop (issue 18 measured
the served torch engine at 0.58x of its offline speed on class B); and one decode
step of a small LM in eager torch is mostly per-operator dispatch.

Pin an engine with ``backend: torch`` / ``backend: onnx`` (or ``--backend``), or a
``precision`` / ``adapter`` for a causal LM (those need torch);
``MODELKILN_SERVE_PICK=0`` turns the choice off; a variant directory written by
``kiln optimize`` is served as it is (that stage chose it on an evaluation set).
Models with less than :data:`MIN_WEIGHT_BYTES` of weights are served on torch
(a test's toy model; a forward of such an encoder is mostly per-call overhead,
and the one-time build would cost more than it saves), causal LMs with more than
:data:`MAX_EXPORT_BYTES` too. The ONNX generation engine has no run-time LoRA
adapters (``/admin/adapters``): serve with ``--backend torch`` to load them.

Example:
    >>> pick = pick_encoder_engine(ModelSpec(path=minilm_dir), cfg)
    >>> pick.backend, pick.onnx_file
    ('onnx', PosixPath('~/.cache/modelkiln/serve-engines/3f2a.../model-int8.onnx'))
    >>> pick_causal_engine(ModelSpec(path=gpt2_dir), cfg).onnx_file.name
    'model_kv-int8.onnx'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelkiln.contract import VARIANT_JSON
from modelkiln.hardware import cache_dir, cpu_info
from modelkiln.serve.config import ModelSpec, ServeConfig, has_torch_weights

log = logging.getLogger("modelkiln.serve")

#: Environment variable: ``0`` / ``off`` serves HF directories on torch (no choice).
PICK_ENV = "MODELKILN_SERVE_PICK"
#: Weights below this size stay on torch (see the module docstring).
MIN_WEIGHT_BYTES = 16 * 2**20
#: Parity gate: every probe embedding's cosine with torch fp32's at least this.
MIN_COSINE = 0.99
#: A non-torch engine must be this much faster to replace torch (noise margin).
MIN_GAIN = 1.05
_BATCH = (16, 128)  # inputs x tokens of the timed batch (the default 2048-token budget)
#: Causal LMs with more weights than this stay on torch: a single-file ONNX graph is
#: one protobuf, capped at 2 GiB (and the export holds a second copy in memory).
MAX_EXPORT_BYTES = 2 * 2**30
#: Generation gate: mean KL(torch fp32 || engine) per token, nats (~0.5 % perplexity).
MAX_MEAN_KL = 0.005
#: Generation gate: share of probe positions whose greedy token agrees (near-ties count).
MIN_AGREE = 0.95
#: Two tokens whose torch fp32 log-probs differ by less than this are a near-tie.
TIE_NATS = 0.05
_PROBES, _STEPS = 8, 16  # generation gate: prompts x teacher-forced decode steps
_PROMPT, _TIMED_STEPS, _ROUNDS = 32, 8, 3  # generation timing: prompt tokens, steps, rounds


@dataclass(frozen=True)
class Pick:
    """The engine an encoder directory is served by, and why."""

    backend: Literal["torch", "onnx"]
    onnx_file: Path | None
    reason: str


def _weights(path: Path) -> list[Path]:
    return sorted([*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")])


def pick_switched_off() -> bool:
    """Whether ``$MODELKILN_SERVE_PICK`` turns the first-start engine pick off."""
    return os.environ.get(PICK_ENV, "1").lower() in ("0", "off", "false", "no")


def skip_reason(spec: ModelSpec, hooked_loader: bool, kind: str = "encoder") -> str | None:
    """Why ``spec`` is served as asked (no choice), or None when the engine is picked here.

    ``kind``: ``encoder`` or ``causal_lm`` (a causal LM's precision and adapter pin torch,
    and it has an upper size bound too).
    """
    path = Path(spec.path)
    if pick_switched_off():
        return f"${PICK_ENV} is off"
    if spec.backend != "auto" or spec.compile:
        return "the backend is pinned"
    if kind == "causal_lm" and spec.precision != "auto":
        return f"the precision is pinned ({spec.precision}: torch)"
    if kind == "causal_lm" and spec.adapter is not None:
        return "an adapter is merged at load (torch only)"
    if hooked_loader:
        return "a plug-in loads the weights"
    if not has_torch_weights(path):
        return "no torch weights"
    if (path / VARIANT_JSON).is_file():
        return "an optimized variant (kiln optimize already chose it)"
    size = sum(f.stat().st_size for f in _weights(path))
    if size < MIN_WEIGHT_BYTES:
        return "small model (per-call overhead dominates)"
    if kind == "causal_lm" and size > MAX_EXPORT_BYTES:
        return "large model (over the 2 GiB a single ONNX graph holds; see kiln optimize)"
    if kind == "causal_lm":
        from modelkiln.hardware import device_name

        if device_name() != "cpu":
            return "a GPU serves it (the ONNX engines here are CPU ones)"
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
    return _cached_pick(spec, cfg, _decide, _encoder_reason, "about a minute")


def pick_causal_engine(spec: ModelSpec, cfg: ServeConfig, hooked_loader: bool = False) -> Pick:
    """The fastest engine for the causal LM ``spec`` here (built, gated and timed once, cached).

    ``Pick.onnx_file`` is then a KV-cache graph for the generation engine's ONNX
    backend. Never raises for a failed export, quantization or gate run: the server
    then runs torch and logs why.
    """
    skip = skip_reason(spec, hooked_loader, "causal_lm")
    if skip is not None:
        return Pick("torch", None, skip)
    # the gate's bounds and the timed batch are part of the key: changing either re-decides
    terms = (MAX_MEAN_KL, MIN_AGREE, TIE_NATS, _PROBES, _STEPS, cfg.generation.max_num_seqs)
    key = "-" + hashlib.sha256(repr(terms).encode()).hexdigest()[:8]
    return _cached_pick(spec, cfg, _decide_causal, _causal_reason, "a minute or two", key)


def engines_dir(path: Path) -> Path:
    """Where the engines built for the model at ``path`` and their decisions are cached."""
    return cache_dir() / "serve-engines" / model_hash(path)[:20]


def _cached_pick(
    spec: ModelSpec,
    cfg: ServeConfig,
    decide: Callable[[ModelSpec, ServeConfig, Path], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    duration: str,
    key: str = "",
) -> Pick:
    """The decision cached for ``spec`` on this machine (and ``key``), else ``decide`` it now
    and cache it."""
    path = Path(spec.path)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return Pick("torch", None, "onnxruntime is not installed (the onnx extra)")
    where = engines_dir(path)
    decision_file = where / f"decision-{_machine()}{key}.json"
    if not decision_file.is_file():
        where.mkdir(parents=True, exist_ok=True)
        # --workers N start together: one builds and times (alone on the cores), the rest
        # wait for its decision instead of timing N engines at once
        with _exclusive(where / f"{decision_file.stem}.lock"):
            if not decision_file.is_file():
                return _build(spec, cfg, decide, describe, duration, where, decision_file)
    data = json.loads(decision_file.read_text(encoding="utf-8"))
    pick = _from_decision(data, where, describe)
    log.info("engine of %s: %s (decided at first start; %s)", spec.served_name,
             data["engine"], pick.reason)  # fmt: skip
    return pick


def _build(
    spec: ModelSpec,
    cfg: ServeConfig,
    decide: Callable[[ModelSpec, ServeConfig, Path], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    duration: str,
    where: Path,
    decision_file: Path,
) -> Pick:
    log.info(
        "first start of %s: building its ONNX engines and timing them once (%s; "
        "cached in %s)", spec.served_name, duration, where,
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        data = decide(spec, cfg, where)
    except Exception as exc:  # boundary: any export / quantization failure -> keep torch
        log.warning("cannot build the ONNX engines of %s (%s): serving on torch",
                    spec.served_name, exc)  # fmt: skip
        return Pick("torch", None, f"ONNX build failed: {exc}")
    finally:
        return_freed_memory()
    data["seconds"] = round(time.monotonic() - t0, 1)
    scratch = decision_file.with_name(f"{decision_file.name}.{os.getpid()}.partial")
    scratch.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(scratch, decision_file)  # a reader never sees a half-written decision
    pick = _from_decision(data, where, describe)
    log.info("engine of %s: %s (%s; took %.0f s)", spec.served_name, data["engine"],
             pick.reason, data["seconds"])  # fmt: skip
    return pick


def return_freed_memory() -> None:
    """Give the heap that the candidate engines freed back to the OS (glibc; else a no-op).

    A first start builds, gates and times three engines, then drops all but the one
    it serves. Their memory goes back to the allocator, but glibc's malloc keeps freed
    pages mapped: the first-start process served with ~540 MiB more RSS than a restart
    with the cached decision (27.6 M GPT-2, class A, 1,275 vs 732 MiB). ``gc.collect``
    frees what cycles still hold; ``malloc_trim(0)`` then returns the free pages of
    every arena. Hand-written because no library wraps it (it is one libc call).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return
    trim(0)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_file`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: workers may build side by side (partial files + rename)
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _from_decision(
    data: dict[str, Any], where: Path, describe: Callable[[dict[str, Any]], str]
) -> Pick:
    reason = describe(data)
    file = data.get("file")
    if not file or not (where / file).is_file():
        return Pick("torch", None, reason)
    return Pick("onnx", where / data["file"], reason)


def _encoder_reason(data: dict[str, Any]) -> str:
    figures = ", ".join(
        f"{name} {c['per_s']:.0f}/s cos {c['min_cosine']:.4f}"
        for name, c in data["candidates"].items()
    )
    return f"sentences/s at 16x128 and min cosine vs torch fp32: {figures}"


def _causal_reason(data: dict[str, Any]) -> str:
    figures = ", ".join(
        f"{name} {c['tok_s']:.0f} tok/s KL {c['mean_kl']:.4f} agree {c['agree']:.3f}"
        f"{'' if c['pass'] else ' (gate failed)'}"
        for name, c in data["candidates"].items()
    )
    batch = data.get("batch", "?")
    return f"decode tok/s at batch {batch} and gate vs torch fp32: {figures}"


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


# ------------------------------------------------------------------ causal LMs
def _decide_causal(spec: ModelSpec, cfg: ServeConfig, where: Path) -> dict[str, Any]:
    """Export the KV-cache graph, quantize it, gate and time the three engines."""
    from modelkiln.contract.hfmodel import inspect_model, load_torch_model
    from modelkiln.serve.enginebuild import export_causal_kv, quantize_int8
    from modelkiln.serve.generation.backend import TorchCausalLMBackend
    from modelkiln.serve.generation.ort_backend import OrtCausalLMBackend

    path = Path(spec.path)
    where.mkdir(parents=True, exist_ok=True)
    torch_backend = TorchCausalLMBackend.from_path(path, precision=spec.precision)
    dtype = str(torch_backend.dtype).removeprefix("torch.")
    torch_name = {"float32": "torch-fp32", "bfloat16": "torch-bf16"}.get(dtype, f"torch-{dtype}")
    reference = (
        torch_backend
        if dtype == "float32"
        else TorchCausalLMBackend(load_torch_model(inspect_model(path, "causal-lm")))
    )
    fp32_file, int8_file = where / "model_kv.onnx", where / "model_kv-int8.onnx"
    if not fp32_file.is_file():
        log.info("  %s: exporting the KV-cache ONNX graph (fp32)", spec.served_name)
        export_causal_kv(path, fp32_file, reference.model)
    if not int8_file.is_file():
        log.info("  %s: quantizing it (int8 dynamic)", spec.served_name)
        quantize_int8(fp32_file, int8_file)
    backends: dict[str, Any] = {
        torch_name: torch_backend,
        "onnx-fp32": OrtCausalLMBackend(fp32_file, torch_backend.config, threads=cfg.threads),
        "onnx-int8": OrtCausalLMBackend(int8_file, torch_backend.config, threads=cfg.threads),
    }
    files = {"onnx-fp32": fp32_file.name, "onnx-int8": int8_file.name}
    room = min(b.max_model_len for b in backends.values()) - _STEPS - 2
    probes = _prompts(path, _probe_lengths(room))
    log.info("  %s: gating %d engines against torch fp32 (%d prompts x %d steps)",
             spec.served_name, len(backends), len(probes), _STEPS)  # fmt: skip
    gen = cfg.generation
    rows: dict[str, dict[str, Any]] = {
        name: generation_gate(reference, backend, probes, _STEPS)
        for name, backend in backends.items()
    }
    batch = gen.max_num_seqs
    width = max(1, min(_PROMPT, gen.max_batched_tokens // batch, room))
    log.info("  %s: timing decode at batch %d", spec.served_name, batch)
    speeds = _decode_speeds(backends, _prompts(path, [width] * batch, seed=1))
    for name, row in rows.items():
        row["tok_s"] = round(speeds[name], 1)
    gate = {"max_mean_kl": MAX_MEAN_KL, "min_agree": MIN_AGREE, "tie_nats": TIE_NATS,
            "probes": len(probes), "steps": _STEPS}  # fmt: skip
    passing = [n for n, r in rows.items() if r["pass"]]
    best = max(passing, key=lambda n: rows[n]["tok_s"], default=torch_name)
    if best != torch_name and rows[best]["tok_s"] < MIN_GAIN * rows[torch_name]["tok_s"]:
        best = torch_name
    return {
        "kind": "causal_lm",
        "engine": best,
        "file": files.get(best),
        "batch": batch,
        "candidates": rows,
        "gate": gate,
    }


def generation_gate(
    reference: Any, candidate: Any, prompts: Sequence[Sequence[int]], steps: int
) -> dict[str, Any]:
    """Teacher-forced greedy decoding of ``prompts`` by both backends, compared per position.

    ``reference`` decodes greedily; ``candidate`` is fed the reference's tokens (so one
    early flip does not make every later position differ). Both take the generation
    engine's backend interface (prefill / decode / release), so the candidate runs the
    very code the server will run. Returns ``mean_kl`` (nats per position),
    ``agree`` (greedy agreement, near-ties within :data:`TIE_NATS` counting),
    ``max_dlogp`` (largest shift of the reference's greedy token's log-prob) and ``pass``.
    """
    ref, tokens = _forced_run(reference, prompts, steps, None)
    got, _ = _forced_run(candidate, prompts, steps, tokens)
    return gate_figures(ref, got)


def gate_figures(ref: Any, got: Any) -> dict[str, Any]:
    """The gate's figures from log-probs ``[positions, vocab]`` of the reference and an engine."""
    import torch

    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
    kl = kl.clamp(min=0.0)  # rounding makes identical rows come out at -1e-9
    pick = got.argmax(-1, keepdim=True)
    top = ref.argmax(-1, keepdim=True)
    regret = ref.gather(-1, top) - ref.gather(-1, pick)
    mean_kl = float(kl.mean())
    agree = float((regret <= TIE_NATS).float().mean())
    dlogp = float((got.gather(-1, top) - ref.gather(-1, top)).abs().max())
    ok = mean_kl <= MAX_MEAN_KL and agree >= MIN_AGREE  # NaN compares False: a broken engine fails
    return {"mean_kl": round(mean_kl, 6), "agree": round(agree, 4),
            "max_dlogp": round(dlogp, 4), "pass": bool(ok)}  # fmt: skip


def _forced_run(
    backend: Any, prompts: Sequence[Sequence[int]], steps: int, tokens: list[list[int]] | None
) -> tuple[Any, list[list[int]]]:
    """Log-probs ``[(steps + 1) * len(prompts), vocab]`` and the tokens fed at each step."""
    import torch

    rids = [f"__gate{i}__" for i in range(len(prompts))]
    backend.reset()
    logits = backend.prefill(list(zip(rids, prompts, strict=True)))
    out = [torch.log_softmax(logits.float(), -1)]
    fed: list[list[int]] = []
    for k in range(steps):
        nxt = tokens[k] if tokens is not None else out[-1].argmax(-1).tolist()
        fed.append(nxt)
        out.append(torch.log_softmax(backend.decode(rids, nxt).float(), -1))
    backend.reset()
    return torch.cat(out), fed


def _decode_speeds(
    backends: dict[str, Any], prompts: list[list[int]], rounds: int = _ROUNDS
) -> dict[str, float]:
    """Generated tokens/s of each backend decoding ``prompts`` together (greedy).

    Each round prefills the batch, then times :data:`_TIMED_STEPS` decode steps (the
    greedy pick included, as the server pays for a sampler); best round of each,
    candidates interleaved so a burst of load elsewhere hits them alike.
    """
    best = dict.fromkeys(backends, float("inf"))
    rids = [f"__time{i}__" for i in range(len(prompts))]
    for backend in backends.values():
        backend.warmup()
    for _ in range(rounds):
        for name, backend in backends.items():
            backend.reset()
            nxt = backend.prefill(list(zip(rids, prompts, strict=True))).argmax(-1).tolist()
            t0 = time.perf_counter()
            for _ in range(_TIMED_STEPS):
                nxt = backend.decode(rids, nxt).argmax(-1).tolist()
            best[name] = min(best[name], time.perf_counter() - t0)
            backend.reset()
    return {name: len(prompts) * _TIMED_STEPS / seconds for name, seconds in best.items()}


def _probe_lengths(room: int) -> list[int]:
    """Prompt lengths of the gate: short to long, so the batch is left-padded as served."""
    return [max(1, min(n, room)) for n in (3, 5, 8, 13, 21, 34, 55, 89)[:_PROBES]]


def _prompts(path: Path, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """Token ids of seeded text from the tokenizer's own vocabulary words, one per length.

    Text as clients send it rather than random ids: quantization error is larger on
    ids no text produces, so random ids would gate on inputs that never come.
    """
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    words = words or ["hello", "world"]
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = list(tokenizer(" ".join(rng.choices(words, k=n)))["input_ids"])[:n]
        out.append(ids or [0])
    return out
