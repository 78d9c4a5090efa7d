"""Timed probes: peak matmul throughput per dtype, and the tiny-GPT-2 smoke test."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from modelkiln.doctor.report import Dtype, SmokeResult, Throughput

DTYPES: tuple[Dtype, ...] = ("fp32", "bf16", "int8")
MIN_SAMPLE_S = 0.02  # a timed sample repeats the matmul until it lasts this long
PROBE_SIZE = 256  # the size-doubling search for an affordable size starts here


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _matmul(dtype: Dtype, n: int, device: str) -> Callable[[], Any]:
    """A closure running one ``n``×``n`` @ ``n``×``n`` product in ``dtype`` on ``device``."""
    import torch

    if dtype == "int8":
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device) for _ in "ab")
        return lambda: torch._int_mm(a, b)  # int8 x int8 -> int32
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b, out = (torch.randn(n, n, dtype=tdtype, device=device) for _ in "abc")
    return lambda: torch.mm(a, b, out=out)


def _timed(fn: Callable[[], Any], inner: int, device: str) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return max(time.perf_counter() - start, 1e-9) / inner


def _best_time(fn: Callable[[], Any], repeats: int, device: str) -> float:
    """Seconds per call: one warm-up, then the best of ``repeats`` samples."""
    fn()  # warm-up: kernel choice, allocations, oneDNN/cuBLAS handles and caches
    _sync(device)
    first = _timed(fn, 1, device)
    inner = max(1, min(1000, math.ceil(MIN_SAMPLE_S / first)))
    return min([first, *(_timed(fn, inner, device) for _ in range(repeats))])


def _affordable_size(dtype: Dtype, size: int, device: str, per_call: float) -> int:
    """Largest n <= ``size`` whose matmul should take <= ``per_call`` s, found by doubling n.

    Each step extrapolates only 8× (n³), so a slow-but-normal fp32 path keeps the full
    size while a kernel-less path (seconds per call) stops early.
    """
    n = min(size, PROBE_SIZE)
    while n < size:
        seconds = _best_time(_matmul(dtype, n, device), 0, device)
        bigger = min(size, 2 * n)
        if seconds * (bigger / n) ** 3 > per_call:
            return min(bigger, max(64, int(n * (per_call / seconds) ** (1 / 3)) // 64 * 64))
        n = bigger
    return n


def measure_matmul(
    dtype: Dtype, *, size: int = 2048, repeats: int = 5, device: str = "cpu", budget_s: float = 6.0
) -> Throughput:
    """Peak throughput of a square ``size`` matmul in ``dtype`` on ``device`` (2·n³ ops per call).

    fp32 and bf16 use ``torch.mm``; int8 uses ``torch._int_mm`` (int8 × int8 → int32).
    A path so slow that ``repeats`` calls would overrun ``budget_s`` (bf16 without
    AMX/AVX512-BF16 can be 100× slower than fp32) is timed at a smaller size, said in
    ``note``. A dtype path the build or device lacks gives ``value=None`` and the reason.
    """
    import torch

    unit = "GOP/s" if dtype == "int8" else "GFLOP/s"
    if dtype == "int8" and not hasattr(torch, "_int_mm"):
        return Throughput(device=device, dtype=dtype, unit=unit, note="torch._int_mm is missing")
    try:
        n = _affordable_size(dtype, size, device, per_call=budget_s / (repeats + 2))
        best = _best_time(_matmul(dtype, n, device), repeats, device)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        # The dtype has no kernel on this device/build (e.g. _int_mm shape rules on CUDA).
        return Throughput(device=device, dtype=dtype, unit=unit, note=_one_line(exc))
    note = None
    if n != size:
        note = f"slow path: timed at n={n}, not {size}, to stay within {budget_s:g} s"
    return Throughput(
        device=device,
        dtype=dtype,
        unit=unit,
        size=n,
        value=2 * n**3 / best / 1e9,
        best_s=best,
        note=note,
    )


def measure_all(
    devices: list[str], *, size: int = 2048, repeats: int = 5, budget_s: float = 6.0
) -> list[Throughput]:
    """:func:`measure_matmul` for fp32, bf16 and int8 on every device in ``devices``."""
    return [
        measure_matmul(dtype, size=size, repeats=repeats, device=device, budget_s=budget_s)
        for device in devices
        for dtype in DTYPES
    ]


def run_smoke_test(device: str = "cpu") -> SmokeResult:
    """Build a 2-layer random GPT-2 in code, run a forward pass and a 5-token greedy generate.

    Latencies are the best of 3 calls after 2 warm-up calls. Passes when the logits
    have the expected shape and are finite, ``generate`` returns 5 new tokens, and
    its first token is the forward pass's argmax. Nothing is downloaded.
    """
    try:
        return _smoke(device)
    # Boundary: whatever breaks here (import, kernel, generate) means the stack cannot run a model.
    except Exception as exc:
        return SmokeResult(passed=False, device=device, error=_one_line(exc))


def _best_of(
    fn: Callable[[], Any], device: str, warmup: int = 2, runs: int = 3
) -> tuple[float, Any]:
    """Best time of ``runs`` calls after ``warmup`` (first calls pay lazy init), and a result."""
    for _ in range(warmup):
        fn()
    best, result = math.inf, None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def _smoke(device: str) -> SmokeResult:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab, prompt = 256, 8
    config = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model: Any = GPT2LMHeadModel(config)  # transformers types `.to` too narrowly for mypy
    model = model.to(device).eval()
    ids = torch.arange(1, prompt + 1, device=device).unsqueeze(0)  # (1, prompt)
    with torch.inference_mode():
        forward_s, logits = _best_of(lambda: model(ids).logits, device)  # (1, prompt, vocab)
        generate_s, out = _best_of(
            lambda: model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                do_sample=False,
            ),
            device,
        )  # fmt: skip
    problems = []
    if tuple(logits.shape) != (1, prompt, vocab):
        problems.append(f"logits shape {tuple(logits.shape)}, expected {(1, prompt, vocab)}")
    elif not bool(torch.isfinite(logits).all()):
        problems.append("logits contain NaN or inf")
    if tuple(out.shape) != (1, prompt + 5):
        problems.append(f"generate returned shape {tuple(out.shape)}, expected {(1, prompt + 5)}")
    elif not problems and int(out[0, prompt]) != int(logits[0, -1].argmax()):
        problems.append("greedy generate disagrees with the forward pass's argmax")
    return SmokeResult(
        passed=not problems,
        device=device,
        forward_ms=forward_s * 1e3,
        generate_ms=generate_s * 1e3,
        error="; ".join(problems) or None,
    )
