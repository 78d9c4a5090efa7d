"""Hardware-aware defaults shared by every stage: CPU class, precision and int8 decisions.

``precision: auto`` is decided by measurement, not by CPU flags: a short matmul
micro-benchmark (about 1 s, shapes near the model's) times fp32, bf16 and int8
on this CPU, once per machine (CPU model + flags + torch version; cached under
:func:`cache_dir`). bf16 is chosen only where it measures at least
:data:`MIN_SPEEDUP` × fp32 *and* its result stays within :data:`TOLERANCE`
of fp32; otherwise fp32. The same rule picks whether ``optimize`` tries its torch
int8 / bf16 variants by default. Every decision carries the measured reason.

The CPU class can be overridden with ``MODELKILN_CPU_CLASS=avx2|avx512_bf16|amx``:
the probes (:func:`modelkiln.cpu.cpu_info`) then report that class's
flags and the decisions use the figures measured on that class
(/work/shared/PLATFORM.md, docs/BENCHMARKS.md), labelled "assumed from class X".
Tests use it to run every class's code path on any machine.

Example:
    >>> d = precision_decision("auto", "cpu")
    >>> d.value, d.reason   # ('bf16', 'measured bf16 2.31x fp32 (...), error 2.1e-03 ...')
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from modelkiln.cpu import (  # re-exported: the CPU facts live in core modelkiln.cpu
    CLASSES,
    CPU_CLASS_ENV,
    CpuClass,
    classify,
    cpu_class_override,
    cpu_info,
)
from modelkiln.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Resolved = Literal["fp32", "bf16", "fp16"]

MIN_SPEEDUP = 1.2  # bf16 / int8 must beat fp32 by this much to be chosen
# Largest relative error (Frobenius) of a bf16 matmul against fp32 that "auto" accepts:
# bf16 keeps 8 mantissa bits (eps 2**-8 = 3.9e-3); a correct kernel accumulating in fp32
# lands near 2e-3 at these sizes.
BF16_MAX_REL_ERROR = 1e-2
# Largest relative error of a model's bf16 output (hidden states / logits) against fp32
# that "auto" accepts: a few bf16 roundings deep, a healthy model stays near 1e-2.
BF16_MAX_OUTPUT_ERROR = 5e-2
# Output tolerance (absolute, on unit-scale outputs such as normalised embeddings or
# logits of a tiny model) for comparing a model run at a precision with its reference.
TOLERANCE: dict[str, float] = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}
CACHE_ENV = "MODELKILN_CACHE_DIR"
BENCH_SHAPE = (256, 512, 512)  # (tokens, in, out) of the timed matmul; ~0.07 GFLOP
BENCH_TOKENS = 256  # rows of the timed matmul: a batch of tokens
SHAPE_LIMITS = (64, 4096)  # model dims are clipped here so one shape times in well under 1 s
BENCH_BUDGET_S = 0.25  # time per dtype; three dtypes stay well under 2 s


@dataclass(frozen=True)
class Decision:
    """A hardware decision and why: ``value`` is what runs, ``reason`` says why in words."""

    name: str  # "precision" or "int8"
    value: str
    reason: str
    source: Literal["explicit", "cuda", "measured", "assumed"]
    speedup: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for reports and JSON."""
        return asdict(self)


def cpu_class() -> CpuClass:
    """This machine's CPU class (or the overridden one)."""

    return classify(cpu_info().flags)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (flags only; see decisions)."""
    return cpu_class() != "avx2"


def device_name() -> str:
    """``cuda`` when a CUDA GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """modelkiln's per-user cache: ``$MODELKILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/modelkiln``,
    else ``~/.cache/modelkiln`` (the XDG rule platformdirs applies on Linux)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelkiln"


def _machine_key(shape: tuple[int, int, int]) -> str:
    import torch

    info = cpu_info()
    flags = ",".join(sorted(f for f, v in info.flags.items() if v))
    raw = f"{info.model}|{flags}|torch {torch.__version__}|{torch.get_num_threads()}t|{shape}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _time(fn: Any, budget_s: float) -> float:
    """Best seconds per call of ``fn`` within about ``budget_s`` (one warm-up call first)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if elapsed > budget_s / 2:  # a kernel-less path: one sample is enough
            break
    return best


def _measure(shape: tuple[int, int, int]) -> dict[str, float | None]:
    """GFLOP/s of fp32, bf16 and int8 matmuls at ``shape`` and bf16's relative error."""
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    flop = 2 * m * k * n / 1e9
    out: dict[str, float | None] = {
        "fp32": flop / _time(lambda: a @ b, BENCH_BUDGET_S),
        "bf16": flop / _time(lambda: a16 @ b16, BENCH_BUDGET_S),
        "int8": None,
    }
    ref = a.double() @ b.double()
    out["bf16_rel_error"] = float(((a16 @ b16).double() - ref).norm() / ref.norm())
    if hasattr(torch, "_int_mm"):
        ai = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        bi = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
        try:
            out["int8"] = flop / _time(lambda: torch._int_mm(ai, bi), BENCH_BUDGET_S)
        except RuntimeError:  # no int8 kernel for this shape/build
            out["int8"] = None
    return out


@cache
def measured_throughput(shape: tuple[int, int, int] = BENCH_SHAPE) -> dict[str, Any]:
    """fp32 / bf16 / int8 matmul throughput on this CPU, measured once per machine.

    Read from ``cache_dir()/hardware.json`` when this CPU model, flag set, torch
    version and thread count were measured before; else timed (about 1 s) and saved.
    """
    key = _machine_key(shape)
    path = cache_dir() / "hardware.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return dict(cached[key], cached=True)
    result: dict[str, Any] = {**_measure(shape), "shape": list(shape), "at": time.time()}
    cached[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)  # atomic: parallel processes never read half a file
    except OSError:
        pass  # a read-only home still gets a decision, just measured again next time
    return dict(result, cached=False)


def matmul_shape(hidden: int, ffn: int | None = None) -> tuple[int, int, int]:
    """The timed matmul for a model ``hidden`` wide: its feed-forward up-projection.

    ``(BENCH_TOKENS, hidden, ffn or 4*hidden)``, each dim clipped to :data:`SHAPE_LIMITS`
    and rounded up to a multiple of 16 (torch's int8 matmul needs multiples of 8).
    """
    lo, hi = SHAPE_LIMITS

    def fit(n: int) -> int:
        return min(hi, max(lo, -(-n // 16) * 16))

    return (BENCH_TOKENS, fit(hidden), fit(ffn or 4 * hidden))


def model_matmul_shape(model_dir: str | Path) -> tuple[int, int, int] | None:
    """:func:`matmul_shape` of the model whose ``config.json`` is in ``model_dir`` (None: unknown).

    Reads the JSON only (no transformers import): ``hidden_size`` / ``n_embd`` / ``d_model``
    and ``intermediate_size`` / ``n_inner`` / ``ffn_dim``.
    """
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    hidden = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if config.get(k)), None)
    ffn = next(
        (config[k] for k in ("intermediate_size", "n_inner", "ffn_dim") if config.get(k)), None
    )
    if not isinstance(hidden, int):
        return None
    return matmul_shape(hidden, ffn if isinstance(ffn, int) else None)


def _figures(shape: tuple[int, int, int] | None = None) -> tuple[dict[str, Any], str]:
    """Throughput figures and where they come from (measured here, or assumed from a class)."""
    forced = cpu_class_override()
    if forced is not None:
        p = CLASSES[forced]
        figures: dict[str, Any] = {"fp32": p.fp32, "bf16": p.bf16, "int8": p.int8}
        figures["bf16_rel_error"] = 2e-3  # a correct bf16 kernel's error at these sizes
        return figures, f"assumed from class {forced} ({p.label}; {CPU_CLASS_ENV} is set)"
    figures = measured_throughput(shape or BENCH_SHAPE)
    where = "cached measurement" if figures.get("cached") else "measured"
    timed = "x".join(str(n) for n in figures["shape"])
    return figures, f"{where}, {timed} matmul"


def _speed_decision(name: str, fast: str, figures: dict[str, Any], origin: str) -> Decision:
    source: Literal["measured", "assumed"] = (
        "assumed" if origin.startswith("assumed") else "measured"
    )
    fp32, other = figures.get("fp32"), figures.get(fast)
    if not fp32 or other is None:
        return Decision(name, "fp32", f"{fast} has no kernel here ({origin})", source)
    ratio = other / fp32
    speeds = f"{fast} {other:,.0f} vs fp32 {fp32:,.0f} G/s = {ratio:.2f}x"
    if ratio < MIN_SPEEDUP:
        return Decision(name, "fp32", f"{speeds} < {MIN_SPEEDUP}x needed ({origin})", source, ratio)
    error = figures.get("bf16_rel_error")
    if fast == "bf16" and (error is None or error > BF16_MAX_REL_ERROR):
        why = f"{speeds}, but bf16 error {error} > {BF16_MAX_REL_ERROR} ({origin})"
        return Decision(name, "fp32", why, source, ratio)
    return Decision(name, fast, f"{speeds} >= {MIN_SPEEDUP}x ({origin})", source, ratio)


def precision_decision(
    precision: Precision = "auto",
    device: str | None = None,
    shape: tuple[int, int, int] | None = None,
) -> Decision:
    """The concrete precision for ``precision`` on ``device``, with the reason.

    ``shape`` is the matmul the model will run (:func:`matmul_shape`,
    :func:`model_matmul_shape`); ``auto`` times fp32 and bf16 at that shape (once per
    machine and shape, cached). None: the generic :data:`BENCH_SHAPE`.

    Raises:
        ConfigError: fp16 asked for on a CPU (no fp16 fast path, and no loss scaling there).
    """
    device = device or device_name()
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            raise ConfigError(
                "precision 'fp16' needs a CUDA GPU (CPUs have no fp16 fast path)",
                hint="use precision: auto, fp32 or bf16",
            )
        return Decision("precision", precision, "set in the config", "explicit")
    if device.startswith("cuda"):
        import torch

        value = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Decision("precision", value, f"CUDA GPU, bf16 supported: {value == 'bf16'}", "cuda")
    return _speed_decision("precision", "bf16", *_figures(shape))


def confirm_bf16_output(decision: Decision, model: Any, inputs: dict[str, Any]) -> Decision:
    """Keep an ``auto`` bf16 decision only if ``model``'s output stays within tolerance.

    Runs ``model`` (fp32, eval) on ``inputs`` as it is and as a bf16 copy and compares
    the first output tensor (hidden states or logits): relative error (Frobenius) at most
    :data:`BF16_MAX_OUTPUT_ERROR`. Other decisions pass through unchanged.
    """
    if decision.value != "bf16" or decision.source == "explicit":
        return decision
    import copy

    import torch

    with torch.inference_mode():
        ref = model(**inputs)[0].double()
        got = copy.deepcopy(model).to(torch.bfloat16)(**inputs)[0].double()
    error = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
    if error <= BF16_MAX_OUTPUT_ERROR:
        reason = f"{decision.reason}; model output error {error:.1e} <= {BF16_MAX_OUTPUT_ERROR}"
        return Decision(decision.name, "bf16", reason, decision.source, decision.speedup)
    reason = f"{decision.reason}, but model output error {error:.1e} > {BF16_MAX_OUTPUT_ERROR}"
    return Decision(decision.name, "fp32", reason, decision.source, decision.speedup)


def int8_decision() -> Decision:
    """``int8`` when torch int8 matmuls beat fp32 here by :data:`MIN_SPEEDUP`, else ``fp32``."""
    return _speed_decision("int8", "int8", *_figures())


def resolve_precision(precision: Precision, device: str | None = None) -> Resolved:
    """Turn ``auto`` into a concrete precision for ``device`` and validate explicit choices.

    Raises:
        ConfigError: fp16 asked for on a CPU (no fp16 fast path, and no loss scaling there).
    """
    return precision_decision(precision, device).value  # type: ignore[return-value]


def clear_caches() -> None:
    """Forget probed and measured facts (after changing ``MODELKILN_CPU_CLASS`` in-process)."""

    measured_throughput.cache_clear()
    clear = getattr(cpu_info, "cache_clear", None)
    if clear is not None:
        clear()


def torch_dtype(precision: str) -> object:
    """The torch dtype of a concrete precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
