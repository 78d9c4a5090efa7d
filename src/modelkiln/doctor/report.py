"""The :class:`DoctorReport` model and its table/summary rendering (no torch needed)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, computed_field

from modelkiln.cpu import CpuInfo

Status = Literal["pass", "warn", "fail"]
Dtype = Literal["fp32", "bf16", "int8"]
Row = tuple[str, str, str, str]


class Check(BaseModel):
    """One verdict: ``pass``, ``warn`` (runs, but slower or with less) or ``fail`` (cannot run)."""

    name: str
    status: Status
    detail: str
    fix: str = ""


class PythonInfo(BaseModel):
    """The running interpreter."""

    version: str
    executable: str
    implementation: str


class PlatformInfo(BaseModel):
    """The operating system."""

    system: str
    release: str
    machine: str
    platform: str


class ExtraStatus(BaseModel):
    """Whether an optional extra (``pip install 'modelkiln[<name>]'``) is fully installed."""

    name: str
    installed: bool
    missing: list[str] = []


class GpuDevice(BaseModel):
    """One CUDA device."""

    index: int
    name: str
    memory_gb: float
    capability: str


class GpuInfo(BaseModel):
    """CUDA and Apple MPS availability."""

    cuda_available: bool = False
    device_count: int = 0
    devices: list[GpuDevice] = []
    cuda_version: str | None = None
    bf16_supported: bool = False
    mps_available: bool = False


class ThreadInfo(BaseModel):
    """Intra-/inter-op thread counts of torch and the environment variables that set them."""

    torch_threads: int | None = None
    interop_threads: int | None = None
    env: dict[str, str | None] = {}


class MemoryInfo(BaseModel):
    """System RAM in GB (1e9 bytes)."""

    total_gb: float | None = None
    available_gb: float | None = None


class DiskInfo(BaseModel):
    """Free space in GB on the file system holding ``path``."""

    path: str
    free_gb: float | None = None
    total_gb: float | None = None


class Throughput(BaseModel):
    """Peak square-matmul throughput of one dtype on one device (``value`` None: not measured)."""

    device: str
    dtype: Dtype
    unit: str
    size: int | None = None
    value: float | None = None
    best_s: float | None = None
    note: str | None = None  # why ``value`` is None, or why ``size`` was reduced


class SmokeResult(BaseModel):
    """Outcome of the tiny-GPT-2 forward + greedy-generate smoke test."""

    passed: bool
    device: str
    forward_ms: float | None = None
    generate_ms: float | None = None
    error: str | None = None


class HardwareDecision(BaseModel):
    """A decision ``auto`` settings take on this machine (precision, int8) and its reason."""

    name: str
    value: str
    reason: str
    source: str


class DoctorReport(BaseModel):
    """Everything ``kiln doctor`` found; ``ok`` is False when any check failed."""

    modelkiln_version: str
    created: datetime
    duration_s: float = 0.0
    measured: bool
    python: PythonInfo
    platform: PlatformInfo
    packages: dict[str, str | None]
    import_errors: dict[str, str] = {}
    core_minimums: dict[str, str] = {}  # core packages older than pyproject's minimum
    distribution_found: bool = True  # False: modelkiln runs from a source tree, extras unknown
    extras: list[ExtraStatus] = []
    cpu: CpuInfo
    gpu: GpuInfo
    threads: ThreadInfo
    memory: MemoryInfo
    disk: DiskInfo
    throughput: list[Throughput] = []
    smoke: SmokeResult | None = None
    decisions: list[HardwareDecision] = []
    checks: list[Check] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return all(c.status != "fail" for c in self.checks)

    def measurement(self, dtype: Dtype, device: str = "cpu") -> Throughput | None:
        """The throughput entry for ``dtype`` on ``device``, if one was taken."""
        return next((t for t in self.throughput if t.dtype == dtype and t.device == device), None)

    def speedup(self, dtype: Dtype, device: str = "cpu") -> float | None:
        """Throughput of ``dtype`` over fp32 on the same device (None if either is missing)."""
        ref, other = self.measurement("fp32", device), self.measurement(dtype, device)
        if ref is None or other is None or not ref.value or other.value is None:
            return None
        return other.value / ref.value

    def rows(self) -> list[Row]:
        """Flatten the report into ``(section, item, value, status)`` rows for a table.

        Information rows have an empty status; the verdicts are the ``check`` rows at the end.
        """
        py, pl, cpu, gpu = self.python, self.platform, self.cpu, self.gpu
        rows: list[Row] = [
            ("python", "version", f"{py.version} ({py.implementation})", ""),
            ("python", "executable", py.executable, ""),
            ("platform", "os", f"{pl.system} {pl.release} ({pl.machine})", ""),
        ]
        for name, version in self.packages.items():
            error = self.import_errors.get(name)
            value = f"{version or '?'}, import fails: {error}" if error else version
            rows.append(("packages", name, value or "not installed", "fail" if error else ""))
        rows += [
            ("cpu", "model", cpu.model, ""),
            ("cpu", "cores", f"{cpu.logical_cores} logical, {cpu.usable_cores} usable", ""),
            ("cpu", "flags", f"{_flags_text(cpu.flags)} (from {cpu.flags_source})", ""),
            ("cpu", "class", _class_text(cpu.cpu_class), ""),
            ("cpu", "torch capability", cpu.torch_capability or "unknown", ""),
            ("gpu", "cuda", _gpu_text(gpu), ""),
            ("gpu", "mps", "available" if gpu.mps_available else "not available", ""),
            ("threads", "torch", f"{self.threads.torch_threads} intra-op, "
             f"{self.threads.interop_threads} inter-op", ""),
        ]  # fmt: skip
        rows += [("threads", k, v or "unset", "") for k, v in self.threads.env.items()]
        rows += [
            ("memory", "ram", f"{_gb(self.memory.total_gb)} total, "
             f"{_gb(self.memory.available_gb)} available", ""),
            ("disk", self.disk.path,
             f"{_gb(self.disk.free_gb)} free of {_gb(self.disk.total_gb)}", ""),
        ]  # fmt: skip
        for t in self.throughput:
            rows.append(("throughput", f"{t.device} {t.dtype}", _format_throughput(t, self), ""))
        if self.smoke is not None:
            rows.append(("smoke", "tiny gpt-2", _smoke_text(self.smoke), ""))
        for d in self.decisions:
            rows.append(("decision", f"{d.name} auto", f"{d.value} — {d.reason}", ""))
        for c in self.checks:
            rows.append(
                ("check", c.name, c.detail + (f" — fix: {c.fix}" if c.fix else ""), c.status)
            )
        return rows

    def summary_line(self) -> str:
        """One line: verdict, check counts, and the failed checks or the cpu throughput."""
        counts = {s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail")}
        line = f"kiln doctor: {'OK' if self.ok else 'FAIL'} ({counts['pass']} pass, "
        line += f"{counts['warn']} warn, {counts['fail']} fail)"
        failed = [c.name for c in self.checks if c.status == "fail"]
        if failed:
            return f"{line} — failed: {', '.join(failed)}"
        parts = [f"{t.dtype} {_format_throughput(t, self, brief=True)}" for t in self.throughput]
        return f"{line} — {'; '.join(parts)}" if parts else line


def _gb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.1f} GB"


def _flags_text(flags: dict[str, bool | None]) -> str:
    groups = {
        "": [f for f, v in flags.items() if v],
        "absent: ": [f for f, v in flags.items() if v is False],
        "unknown: ": [f for f, v in flags.items() if v is None],
    }
    return " | ".join(label + " ".join(names) for label, names in groups.items() if names) or "none"


def _class_text(name: str) -> str:
    from modelkiln.hardware import CLASSES

    return f"{name} — {CLASSES[name].label}" if name in CLASSES else (name or "unknown")


def _gpu_text(gpu: GpuInfo) -> str:
    if not gpu.cuda_available:
        return "not available"
    devices = ", ".join(f"{d.name} ({d.memory_gb:.0f} GB, sm {d.capability})" for d in gpu.devices)
    bf16 = "bf16" if gpu.bf16_supported else "no bf16"
    return f"CUDA {gpu.cuda_version}, {gpu.device_count} device(s): {devices}; {bf16}"


def _smoke_text(smoke: SmokeResult) -> str:
    if not smoke.passed:
        return f"failed on {smoke.device}: {smoke.error}"
    return (
        f"passed on {smoke.device}: forward {smoke.forward_ms:.1f} ms, "
        f"5-token greedy generate {smoke.generate_ms:.1f} ms"
    )


def _format_throughput(t: Throughput, report: DoctorReport, *, brief: bool = False) -> str:
    """``84.1 GFLOP/s (n=2048)``, with the ratio to fp32 and any note."""
    if t.value is None:
        return f"n/a ({t.note})" if not brief else "n/a"
    text = f"{t.value:,.0f} {t.unit}" if t.value >= 100 else f"{t.value:.3g} {t.unit}"
    ratio = report.speedup(t.dtype, t.device) if t.dtype != "fp32" else None
    if ratio is not None:
        text += f" ({ratio:.3g}× fp32)"
    if brief:
        return f"{t.device} {text}" if t.device != "cpu" else text
    text += f", n={t.size}"
    return f"{text}; {t.note}" if t.note else text
