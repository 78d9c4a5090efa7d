"""Environment verification and hardware baseline (``kiln doctor``).

:func:`run_doctor` inspects the interpreter, packages, optional extras, CPU
(flags, usable cores), GPU, threads, memory and disk. With ``measure=True`` it
also times peak matmul throughput per dtype (fp32, bf16, int8) on the CPU and
any CUDA device, and runs a smoke test on a tiny random GPT-2 built in code
(nothing is downloaded). Findings become :class:`Check` verdicts;
``report.ok`` is False when one fails, i.e. when this machine cannot run the
pipeline. torch is imported only when :func:`run_doctor` runs.

Layout: ``report`` (the pydantic model and its rows), ``probe`` (read-only
environment probes), ``measure`` (timed matmuls, smoke test), ``checks``
(verdicts), ``plot`` (PNG chart).

Example:
    >>> report = run_doctor(measure=False)
    >>> print(report.summary_line())
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from modelkiln import __version__
from modelkiln.doctor import probe
from modelkiln.doctor.checks import make_checks
from modelkiln.doctor.measure import measure_all, measure_matmul, run_smoke_test
from modelkiln.doctor.plot import plot_doctor
from modelkiln.doctor.probe import parse_cpuinfo
from modelkiln.doctor.report import (
    Check,
    CpuInfo,
    DiskInfo,
    DoctorReport,
    ExtraStatus,
    GpuDevice,
    GpuInfo,
    HardwareDecision,
    MemoryInfo,
    PlatformInfo,
    PythonInfo,
    SmokeResult,
    ThreadInfo,
    Throughput,
)
from modelkiln.errors import ConfigError

__all__ = [
    "Check", "CpuInfo", "DiskInfo", "DoctorReport", "ExtraStatus", "GpuDevice", "GpuInfo",
    "HardwareDecision",
    "MemoryInfo", "PlatformInfo", "PythonInfo", "SmokeResult", "ThreadInfo", "Throughput",
    "make_checks", "measure_matmul", "parse_cpuinfo", "plot_doctor", "run_doctor",
    "run_smoke_test",
]  # fmt: skip

log = logging.getLogger(__name__)


def run_doctor(
    *,
    measure: bool = True,
    matmul_size: int = 2048,
    repeats: int = 5,
    path: Path | None = None,
    budget_s: float = 6.0,
) -> DoctorReport:
    """Inspect this environment, optionally measure it, and return the report with its checks.

    Args:
        measure: time the matmuls and run the smoke test (False: probes only, a few seconds).
        matmul_size: side of the square matmuls.
        repeats: timed samples per dtype (best one kept), after one warm-up call.
        path: where the disk-space check looks (default: the current directory).
        budget_s: rough time cap per dtype and device; slower paths are timed at a smaller size.

    Raises:
        ConfigError: ``matmul_size``, ``repeats`` or ``budget_s`` is not positive.

    Example:
        >>> report = run_doctor(matmul_size=1024, repeats=3)
        >>> report.ok, report.speedup("bf16")
    """
    for name, value in (("matmul_size", matmul_size), ("repeats", repeats), ("budget_s", budget_s)):
        if value <= 0:
            raise ConfigError(f"{name} = {value} must be positive", hint=f"pass {name} > 0")
    start = time.perf_counter()
    import_errors = {m: e for m in probe.CORE_MODULES if (e := probe.import_error(m)) is not None}
    requirements = probe.requirements()
    report = DoctorReport(
        modelkiln_version=__version__,
        created=datetime.now(UTC),
        measured=measure,
        python=probe.python_info(),
        platform=probe.platform_info(),
        packages={
            m: probe.package_version(m) for m in (*probe.CORE_MODULES, *probe.OPTIONAL_MODULES)
        },
        import_errors=import_errors,
        core_minimums=probe.core_minimums(requirements),
        distribution_found=requirements is not None,
        extras=probe.extras_status(requirements),
        cpu=probe.cpu_info(),
        gpu=probe.gpu_info(),
        threads=probe.thread_info(),
        memory=probe.memory_info(),
        disk=probe.disk_info(path if path is not None else Path.cwd()),
    )
    if measure and "torch" not in import_errors:
        devices = ["cpu"] + (["cuda"] if report.gpu.cuda_available else [])
        log.info("measuring matmul throughput (n=%d) on %s", matmul_size, ", ".join(devices))
        report.throughput = measure_all(
            devices, size=matmul_size, repeats=repeats, budget_s=budget_s
        )
        log.info("running the tiny GPT-2 smoke test")
        report.smoke = run_smoke_test("cuda" if report.gpu.cuda_available else "cpu")
    elif measure:
        report.smoke = SmokeResult(passed=False, device="cpu", error=import_errors["torch"])
    if "torch" not in import_errors:
        report.decisions = _decisions()
    report.checks = make_checks(report)
    report.duration_s = time.perf_counter() - start
    return report


def _decisions() -> list[HardwareDecision]:
    """What ``precision: auto`` and optimize's int8 default decide here, and why."""
    from modelkiln import hardware

    log.info("timing the fp32 / bf16 / int8 micro-benchmark behind precision: auto")
    found = [hardware.precision_decision("auto", "cpu"), hardware.int8_decision()]
    if probe.gpu_info().cuda_available:
        found.insert(1, hardware.precision_decision("auto", "cuda"))
    return [
        HardwareDecision(name=d.name if i == 0 or d.name != "precision" else "precision (cuda)",
                         value=d.value, reason=d.reason, source=d.source)
        for i, d in enumerate(found)
    ]  # fmt: skip
