"""Hardware-aware defaults shared by every stage (precision, device).

``precision: auto`` means bf16 only where bf16 has a fast kernel — a CUDA GPU
with bf16 support, or a CPU with AMX-BF16 / AVX512-BF16 — and fp32 elsewhere.
On a CPU without those units (e.g. AVX2-only) a bf16 matmul is tens of times
slower than fp32 (see docs/BENCHMARKS.md, doctor section), so "auto" must
never pick it there.

Example:
    >>> resolve_precision("auto")   # 'bf16' on AMX / CUDA, 'fp32' on AVX2-only CPUs
    'fp32'
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from modelkiln.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16."""
    from modelkiln.doctor.probe import cpu_info

    flags = cpu_info().flags
    return bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))


def device_name() -> str:
    """``cuda`` when a CUDA GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(
    precision: Precision, device: str | None = None
) -> Literal["fp32", "bf16", "fp16"]:
    """Turn ``auto`` into a concrete precision for ``device`` and validate explicit choices.

    Raises:
        ConfigError: fp16 asked for on a CPU (no fp16 fast path, and no loss scaling there).
    """
    device = device or device_name()
    if precision == "auto":
        if device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError(
            "precision 'fp16' needs a CUDA GPU (CPUs have no fp16 fast path)",
            hint="use precision: auto, fp32 or bf16",
        )
    return precision


def torch_dtype(precision: Literal["fp32", "bf16", "fp16"]) -> object:
    """The torch dtype of a concrete precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
