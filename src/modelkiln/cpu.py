"""The CPU this process runs on: model, cores, instruction-set flags and class (core, torch-free).

Three CPU classes have been seen on this project's machines (see
docs/BENCHMARKS.md): AVX2 only, AVX-512 + AVX512-BF16 + VNNI, and AVX-512 +
AMX. ``MODELKILN_CPU_CLASS=avx2|avx512_bf16|amx`` makes :func:`cpu_info` report
that class's flags, so every hardware decision (:mod:`modelkiln.hardware`) and
``kiln doctor`` can be exercised for any class on any machine.

Example:
    >>> cpu_info().cpu_class
    'avx512_bf16'
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from modelkiln.errors import ConfigError

CpuClass = Literal["avx2", "avx512_bf16", "amx"]
FlagsSource = Literal["cpuinfo", "torch", "none", "override"]
CPU_CLASS_ENV = "MODELKILN_CPU_CLASS"
CPU_FLAGS = (
    "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


@dataclass(frozen=True)
class ClassProfile:
    """What one CPU class advertises and what was measured on it (2 threads, torch 2.13)."""

    label: str
    flags: tuple[str, ...]
    fp32: float  # GFLOP/s, 2048² matmul
    bf16: float
    int8: float  # GOP/s


# Figures from /work/shared/PLATFORM.md (class A from docs/BENCHMARKS.md, pre-2026-12).
CLASSES: dict[str, ClassProfile] = {
    "avx2": ClassProfile("A: AVX2 only (AMD EPYC Zen 3)", ("avx2",), 130.0, 2.0, 1.0),
    "avx512_bf16": ClassProfile(
        "B: AVX-512 + AVX512-BF16 + VNNI, no AMX (AMD EPYC Zen 4)",
        ("avx2", "avx512f", "avx512_bf16", "avx512_vnni"),
        163.0,
        373.0,
        853.0,
    ),
    "amx": ClassProfile(
        "C: AVX-512 + AMX-BF16 + AMX-INT8 (Intel Sapphire Rapids)",
        ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"),
        340.0,
        2000.0,
        3500.0,
    ),
}


def cpu_class_override() -> CpuClass | None:
    """The class forced by ``MODELKILN_CPU_CLASS`` (None when unset).

    Raises:
        ConfigError: the variable names no known class.
    """
    raw = os.environ.get(CPU_CLASS_ENV, "").strip().lower()
    if not raw:
        return None
    if raw not in CLASSES:
        raise ConfigError(
            f"{CPU_CLASS_ENV}={raw!r} is not a CPU class",
            hint=f"use one of {', '.join(CLASSES)} or unset it",
        )
    return raw  # type: ignore[return-value]


def classify(flags: dict[str, bool | None]) -> CpuClass:
    """The class a set of CPU flags belongs to (AVX2-or-less counts as ``avx2``)."""
    if flags.get("amx_bf16"):
        return "amx"
    if flags.get("avx512_bf16"):
        return "avx512_bf16"
    return "avx2"


class CpuInfo(BaseModel):
    """CPU model, cores this process may use, and the vector/matrix instruction sets present."""

    model: str
    logical_cores: int
    usable_cores: int
    flags: dict[str, bool | None]  # None: could not be determined
    flags_source: FlagsSource
    torch_capability: str | None = None
    cpu_class: str = ""  # avx2 | avx512_bf16 | amx (modelkiln.hardware.CLASSES)


def parse_cpuinfo(text: str) -> tuple[str, dict[str, bool]]:
    """Parse ``/proc/cpuinfo`` text into ``(model name, {flag: present})`` for :data:`CPU_FLAGS`.

    Reads the first ``model name`` (x86) or ``Hardware``/``cpu model`` line and the
    first ``flags`` (x86) or ``Features`` (ARM) line. Returns ``("", {})`` for
    text without a flags line.
    """
    model, found = "", None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and found is None:
            found = set(value.split())
    return model, ({} if found is None else {f: f in found for f in CPU_FLAGS})


def _torch_cpu_flags() -> tuple[dict[str, bool | None], str | None]:
    """Fallback flags from torch's own cpuinfo probe (``None`` where torch cannot tell)."""
    flags: dict[str, bool | None] = dict.fromkeys(CPU_FLAGS)
    try:
        import torch
    except ImportError:
        return flags, None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
        probes = {
            "avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
            "avx512_bf16": "_is_avx512_bf16_supported", "avx512_vnni": "_is_vnni_supported",
            "amx_tile": "_is_amx_tile_supported",
        }  # fmt: skip
        for flag, fn in probes.items():
            probe = getattr(torch.cpu, fn, None)
            flags[flag] = bool(probe()) if probe is not None else None
    except (AttributeError, RuntimeError):
        return flags, None
    return flags, capability


def _usable_cores() -> int:
    """CPUs this process may run on: affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores or 1


def cpu_info(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """CPU model, logical and usable cores, instruction-set flags, class and torch's capability.

    ``MODELKILN_CPU_CLASS`` replaces the flags with that class's (``flags_source="override"``).
    """
    try:
        model, parsed = parse_cpuinfo(cpuinfo_path.read_text(errors="replace"))
    except OSError:
        model, parsed = "", {}
    torch_flags, capability = _torch_cpu_flags()
    flags: dict[str, bool | None] = dict(parsed) if parsed else torch_flags
    source: FlagsSource = "cpuinfo" if parsed else ("torch" if capability else "none")
    model = model or platform.processor() or platform.machine() or "unknown"
    forced = cpu_class_override()
    if forced is not None:  # MODELKILN_CPU_CLASS: every decision sees that class's flags
        flags = {f: f in CLASSES[forced].flags for f in CPU_FLAGS}
        model, source = f"{model} (as class {forced}: {CPU_CLASS_ENV})", "override"
    return CpuInfo(
        model=model,
        logical_cores=os.cpu_count() or 1,
        usable_cores=_usable_cores(),
        flags=flags,
        flags_source=source,
        torch_capability=capability,
        cpu_class=classify(flags),
    )
