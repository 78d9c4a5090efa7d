"""Verdicts: turn a :class:`DoctorReport`'s findings into pass / warn / fail checks.

``fail`` means the pipeline cannot run here (old Python, a core package that
does not import, a failing smoke test, < 2 GB disk, < 4 GB RAM); ``warn`` means
it runs, but slower or with less (no bf16 fast path, a missing extra, thread
oversubscription, bf16 matmul no faster than fp32). Pure functions of the report.
"""

from __future__ import annotations

from modelkiln.doctor.probe import CORE_MODULES, DISTRIBUTIONS
from modelkiln.doctor.report import Check, DoctorReport

MIN_PYTHON = (3, 11)
MIN_DISK_GB = 2.0
MIN_RAM_GB = 4.0
LOW_AVAILABLE_RAM_GB = 2.0


def make_checks(report: DoctorReport) -> list[Check]:
    """All verdicts on ``report`` (it reads only the report, so tests can feed edited copies)."""
    checks = [_python(report), _core(report)]
    if report.core_minimums:
        detail = "; ".join(f"{k} {v}" for k, v in report.core_minimums.items())
        fix = f"pip install --upgrade {' '.join(report.core_minimums)}"
        checks.append(Check(name="core versions", status="warn", detail=detail, fix=fix))
    checks += [_memory(report), _disk(report)]
    if report.smoke is not None:
        checks.append(_smoke(report))
    checks += [c for c in (_threads(report), _bf16_path(report)) if c is not None]
    checks += [_bf16_speed(report, d) for d in dict.fromkeys(t.device for t in report.throughput)]
    checks += _extras(report)
    return checks


def _python(report: DoctorReport) -> Check:
    version = tuple(int(p) for p in report.python.version.split(".")[:2] if p.isdigit())
    if version >= MIN_PYTHON:
        return Check(name="python", status="pass", detail=f"Python {report.python.version}")
    need = ".".join(map(str, MIN_PYTHON))
    return Check(
        name="python",
        status="fail",
        detail=f"Python {report.python.version} is too old; modelkiln needs >= {need}",
        fix=f"create the environment with Python {need} or newer",
    )


def _core(report: DoctorReport) -> Check:
    broken = {m: e for m, e in report.import_errors.items() if m in CORE_MODULES}
    if not broken:
        versions = ", ".join(f"{m} {report.packages.get(m) or '?'}" for m in CORE_MODULES)
        return Check(name="core packages", status="pass", detail=f"import fine: {versions}")
    names = " ".join(DISTRIBUTIONS.get(m, m) for m in broken)
    return Check(
        name="core packages",
        status="fail",
        detail="; ".join(f"{m}: {e}" for m, e in broken.items()),
        fix=f"pip install --force-reinstall {names}  (or reinstall modelkiln)",
    )


def _memory(report: DoctorReport) -> Check:
    total, available = report.memory.total_gb, report.memory.available_gb
    if total is None:
        return Check(
            name="memory", status="warn", detail="RAM size unknown", fix="pip install psutil"
        )
    if total < MIN_RAM_GB:
        return Check(
            name="memory",
            status="fail",
            detail=f"{total:.1f} GB RAM; the pipeline needs >= {MIN_RAM_GB:g} GB",
            fix=f"use a machine (or container limit) with at least {MIN_RAM_GB:g} GB RAM",
        )
    detail = f"{total:.1f} GB RAM, {available or 0:.1f} GB available"
    if available is not None and available < LOW_AVAILABLE_RAM_GB:
        fix = "close memory-hungry programs"
        return Check(name="memory", status="warn", detail=detail, fix=fix)
    return Check(name="memory", status="pass", detail=detail)


def _disk(report: DoctorReport) -> Check:
    free, where = report.disk.free_gb, report.disk.path
    if free is None:
        return Check(name="disk", status="warn", detail=f"free space at {where} unknown")
    if free < MIN_DISK_GB:
        return Check(
            name="disk",
            status="fail",
            detail=f"{free:.2f} GB free at {where}; runs need >= {MIN_DISK_GB:g} GB",
            fix="free disk space, or put runs_dir on a larger disk",
        )
    return Check(name="disk", status="pass", detail=f"{free:,.1f} GB free at {where}")


def _smoke(report: DoctorReport) -> Check:
    smoke = report.smoke
    assert smoke is not None
    if smoke.passed:
        detail = f"tiny GPT-2 forward + generate on {smoke.device}: {smoke.generate_ms:.0f} ms"
        return Check(name="smoke test", status="pass", detail=detail)
    return Check(
        name="smoke test",
        status="fail",
        detail=f"tiny GPT-2 on {smoke.device} failed: {smoke.error}",
        fix="reinstall torch and transformers (pip install --force-reinstall torch transformers)",
    )


def _threads(report: DoctorReport) -> Check | None:
    threads, cores = report.threads.torch_threads, report.cpu.usable_cores
    if threads is None:
        return None
    if threads > cores:
        return Check(
            name="threads",
            status="warn",
            detail=f"torch uses {threads} threads but only {cores} cores are usable "
            "(oversubscription slows every op)",
            fix=f"export OMP_NUM_THREADS={cores}",
        )
    return Check(name="threads", status="pass", detail=f"{threads} torch threads, {cores} cores")


def _bf16_path(report: DoctorReport) -> Check | None:
    flags, gpu = report.cpu.flags, report.gpu
    fast = [f for f in ("amx_bf16", "avx512_bf16") if flags.get(f)]
    if gpu.bf16_supported:
        fast.append("CUDA")
    if fast:
        return Check(name="bf16 fast path", status="pass", detail=f"bf16 via {', '.join(fast)}")
    cpu_unknown = all(flags.get(f) is None for f in ("amx_bf16", "avx512_bf16"))
    unknown = cpu_unknown and not gpu.cuda_available
    return Check(
        name="bf16 fast path",
        status="warn",
        detail="cannot tell whether the CPU has a bf16 unit"
        if unknown
        else "no AMX-BF16 / AVX512-BF16 and no CUDA: bf16 has no fast kernel here",
        fix="keep precision fp32 on this machine (bf16 needs AMX, AVX512-BF16 or a CUDA GPU)",
    )


def _bf16_speed(report: DoctorReport, device: str) -> Check:
    name = f"bf16 speed ({device})"
    fp32, bf16 = report.measurement("fp32", device), report.measurement("bf16", device)
    if fp32 is None or bf16 is None or not fp32.value or bf16.value is None:
        why = next((t.note for t in (fp32, bf16) if t is not None and t.value is None), None)
        return Check(name=name, status="warn", detail=f"not measured: {why or 'unknown reason'}")
    ratio = bf16.value / fp32.value
    detail = f"bf16 {bf16.value:.3g} vs fp32 {fp32.value:.3g} GFLOP/s ({ratio:.3g}×)"
    if ratio <= 1.0:
        fix = "use fp32 here: bf16 saves memory but not time on this machine"
        return Check(name=name, status="warn", detail=detail + ": bf16 is not faster", fix=fix)
    return Check(name=name, status="pass", detail=detail)


def _extras(report: DoctorReport) -> list[Check]:
    if not report.distribution_found:
        return [
            Check(
                name="extras",
                status="warn",
                detail="modelkiln is not installed as a package, so its extras cannot be read",
                fix="pip install -e '.[all]' from the repository",
            )
        ]
    return [
        Check(name=f"extra {e.name}", status="pass", detail="installed")
        if e.installed
        else Check(
            name=f"extra {e.name}",
            status="warn",
            detail=f"missing {', '.join(e.missing)}",
            fix=f"pip install 'modelkiln[{e.name}]'",
        )
        for e in report.extras
    ]
