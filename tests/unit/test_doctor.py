"""kiln doctor's library side: report structure, checks, measurements, plot, cpuinfo parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from modelkiln.doctor import (
    DoctorReport,
    MemoryInfo,
    PythonInfo,
    Throughput,
    make_checks,
    measure_matmul,
    parse_cpuinfo,
    plot_doctor,
    run_doctor,
    run_smoke_test,
)
from modelkiln.doctor.probe import CORE_MODULES, OPTIONAL_MODULES, core_minimums, extras_status
from modelkiln.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPR_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> DoctorReport:
    return run_doctor(measure=False, path=tmp_path_factory.mktemp("disk"))


def _status(report: DoctorReport, name: str) -> str:
    return next(c.status for c in report.checks if c.name == name)


def _with_throughput(report: DoctorReport, fp32: float, bf16: float | None) -> DoctorReport:
    rows = [
        Throughput(device="cpu", dtype="fp32", unit="GFLOP/s", size=256, value=fp32),
        Throughput(device="cpu", dtype="bf16", unit="GFLOP/s", size=256, value=bf16, note="n/a"),
        Throughput(device="cpu", dtype="int8", unit="GOP/s", size=256, value=3 * fp32),
    ]
    return report.model_copy(update={"throughput": rows, "measured": True})


def test_quick_report_structure_and_json_round_trip(quick: DoctorReport) -> None:
    assert not quick.measured and quick.throughput == [] and quick.smoke is None
    assert quick.python.version.startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert set(quick.packages) == {*CORE_MODULES, *OPTIONAL_MODULES}
    assert quick.packages["torch"] is not None and quick.import_errors == {}
    assert set(quick.cpu.flags) >= {"avx2", "avx512f", "amx_bf16", "amx_int8"}
    assert quick.cpu.usable_cores >= 1 and quick.cpu.torch_capability
    assert quick.disk.free_gb is not None and quick.memory.total_gb is not None
    assert quick.threads.torch_threads is not None
    names = {c.name for c in quick.checks}
    assert {"python", "core packages", "memory", "disk", "threads", "bf16 fast path"} <= names
    assert "smoke test" not in names
    assert quick.ok is (all(c.status != "fail" for c in quick.checks))

    data = json.loads(quick.model_dump_json())
    assert data["ok"] == quick.ok and data["cpu"]["flags"] == quick.cpu.flags
    assert DoctorReport.model_validate_json(quick.model_dump_json()) == quick

    rows = quick.rows()
    assert all(len(r) == 4 and all(isinstance(x, str) for x in r) for r in rows)
    assert {r[3] for r in rows} <= {"", "pass", "warn", "fail"}
    assert {"python", "packages", "cpu", "gpu", "threads", "memory", "disk", "check"} <= {
        r[0] for r in rows
    }
    assert quick.summary_line().startswith("kiln doctor: OK" if quick.ok else "kiln doctor: FAIL")


def test_tiny_matmul_gives_positive_throughput() -> None:
    fp32 = measure_matmul("fp32", size=128, repeats=1)
    assert fp32.value is not None and fp32.value > 0
    assert fp32.size == 128 and fp32.unit == "GFLOP/s" and fp32.best_s and fp32.best_s > 0
    for dtype in ("bf16", "int8"):
        t = measure_matmul(dtype, size=128, repeats=1)
        assert (t.value is not None and t.value > 0) or t.note  # unavailable: says why


def test_slow_path_is_timed_at_a_smaller_size() -> None:
    # A budget far below what one 1024 matmul needs forces the size down (never below 64).
    t = measure_matmul("fp32", size=1024, repeats=1, budget_s=1e-6)
    assert t.value is not None and t.value > 0
    assert t.size == 64 and t.note and "n=64" in t.note


def test_measured_run_passes_the_smoke_test(tmp_path: Path) -> None:
    report = run_doctor(matmul_size=128, repeats=1, path=tmp_path)
    assert report.measured and report.smoke is not None
    assert report.smoke.passed, report.smoke.error
    assert _status(report, "smoke test") == "pass"
    fp32 = report.measurement("fp32")
    assert fp32 is not None and fp32.value is not None and fp32.value > 0
    assert any(r[0] == "throughput" for r in report.rows())
    assert "fp32" in report.summary_line() or not report.ok


@pytest.mark.gpu
def test_cuda_is_measured_and_smoke_tested(tmp_path: Path) -> None:
    report = run_doctor(matmul_size=512, repeats=2, path=tmp_path)
    assert report.gpu.cuda_available and report.gpu.devices
    fp32 = report.measurement("fp32", "cuda")
    assert fp32 is not None and fp32.value is not None and fp32.value > 0
    assert report.smoke is not None and report.smoke.device == "cuda" and report.smoke.passed
    assert _status(report, "bf16 fast path") == ("pass" if report.gpu.bf16_supported else "warn")


def test_smoke_test_reports_a_broken_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(transformers, "GPT2LMHeadModel", broken)
    result = run_smoke_test("cpu")
    assert not result.passed and result.error == "RuntimeError: kernel exploded"


def test_missing_core_package_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    report = run_doctor(measure=False, path=tmp_path)
    core = next(c for c in report.checks if c.name == "core packages")
    assert core.status == "fail" and "datasets" in core.detail and "datasets" in core.fix
    assert report.ok is False
    assert json.loads(report.model_dump_json())["ok"] is False
    assert report.summary_line().startswith("kiln doctor: FAIL")
    assert ("packages", "datasets") in {(r[0], r[1]) for r in report.rows() if r[3] == "fail"}


def test_thresholds_fail_or_warn(quick: DoctorReport) -> None:
    py310 = PythonInfo(version="3.10.12", executable="python", implementation="CPython")
    old = quick.model_copy(update={"python": py310})
    small_ram = quick.model_copy(update={"memory": MemoryInfo(total_gb=3.0, available_gb=2.5)})
    full_disk = quick.model_copy(update={"disk": quick.disk.model_copy(update={"free_gb": 1.5})})
    threads = quick.threads.model_copy(update={"torch_threads": quick.cpu.usable_cores + 6})
    busy = quick.model_copy(update={"threads": threads})
    for report, name, status in [
        (old, "python", "fail"),
        (small_ram, "memory", "fail"),
        (full_disk, "disk", "fail"),
        (busy, "threads", "warn"),
    ]:
        report.checks = make_checks(report)
        assert _status(report, name) == status
        assert report.ok is (status != "fail")


def test_bf16_speed_check(quick: DoctorReport) -> None:
    slow = _with_throughput(quick, fp32=100.0, bf16=50.0)
    slow.checks = make_checks(slow)
    assert _status(slow, "bf16 speed (cpu)") == "warn" and slow.speedup("bf16") == 0.5
    fast = _with_throughput(quick, fp32=100.0, bf16=500.0)
    fast.checks = make_checks(fast)
    assert _status(fast, "bf16 speed (cpu)") == "pass" and fast.speedup("int8") == 3.0
    missing = _with_throughput(quick, fp32=100.0, bf16=None)
    missing.checks = make_checks(missing)
    assert _status(missing, "bf16 speed (cpu)") == "warn" and missing.speedup("bf16") is None


def test_bf16_fast_path_follows_cpu_flags(quick: DoctorReport) -> None:
    flags = dict.fromkeys(quick.cpu.flags, False) | {"amx_bf16": True}
    amx = quick.model_copy(update={"cpu": quick.cpu.model_copy(update={"flags": flags})})
    assert _status(amx.model_copy(update={"checks": make_checks(amx)}), "bf16 fast path") == "pass"
    flags = dict.fromkeys(quick.cpu.flags, False)
    plain = quick.model_copy(update={"cpu": quick.cpu.model_copy(update={"flags": flags})})
    if not quick.gpu.bf16_supported:
        checks = make_checks(plain)
        assert next(c for c in checks if c.name == "bf16 fast path").status == "warn"


def test_plot_writes_png(quick: DoctorReport, tmp_path: Path) -> None:
    measured = _with_throughput(quick, fp32=300.0, bf16=2000.0)
    out = plot_doctor(measured, tmp_path / "sub" / "doctor.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    unmeasured = plot_doctor(quick, tmp_path / "quick.png")  # --quick --plot still draws
    assert unmeasured.read_bytes().startswith(PNG_MAGIC)


def test_parse_cpuinfo() -> None:
    model, flags = parse_cpuinfo(SPR_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert all(flags.values()) and set(flags) >= {"avx2", "avx512f", "amx_int8", "avx_vnni"}
    _, flags = parse_cpuinfo("model name : AMD EPYC\nflags : fpu avx avx2 fma\n")
    assert flags["avx2"] and not flags["avx512f"] and not flags["amx_bf16"]
    _, arm = parse_cpuinfo("processor : 0\nFeatures : fp asimd sve\nCPU implementer : 0x41\n")
    assert arm and not any(arm.values())
    assert parse_cpuinfo("") == ("", {})


def test_extras_from_requirement_markers() -> None:
    reqs = [
        "numpy>=1",
        'numpy>=1; extra == "train"',
        'surely-not-a-package-xyz>=1; extra == "train"',
        'numpy>=999; extra == "onnx"',
        'modelkiln[train]; extra == "dev"',
        'modelkiln[train,onnx]; extra == "all"',
    ]
    extras = {e.name: e for e in extras_status(reqs)}
    assert set(extras) == {"train", "onnx", "dev"}
    assert extras["train"].missing == ["surely-not-a-package-xyz"]
    assert not extras["onnx"].installed and extras["onnx"].missing[0].startswith("numpy>=999")
    assert extras["dev"].installed and extras["dev"].missing == []
    assert set(core_minimums(["numpy>=999", "numpy>=1", 'numpy>=999; extra == "x"'])) == {"numpy"}


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="matmul_size"):
        run_doctor(measure=False, matmul_size=0)


def test_importing_doctor_does_not_import_torch() -> None:
    code = "import sys, modelkiln.doctor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_doctor_shows_the_class_and_each_decision_with_its_reason(
    tmp_path: Path, fake_cpu_class: Callable[[str], None]
) -> None:
    fake_cpu_class("avx2")
    report = run_doctor(measure=False, path=tmp_path)
    assert report.cpu.cpu_class == "avx2" and report.cpu.flags_source == "override"
    decisions = {d.name: d for d in report.decisions}
    assert decisions["precision"].value == "fp32" and decisions["int8"].value == "fp32"
    assert "assumed from class avx2" in decisions["precision"].reason
    rows = {(section, item): value for section, item, value, _ in report.rows()}
    assert rows[("cpu", "class")].startswith("avx2 — A: AVX2 only")
    assert rows[("decision", "precision auto")].startswith("fp32 — bf16 2 vs fp32 130")
    fake_cpu_class("amx")
    report = run_doctor(measure=False, path=tmp_path)
    assert {d.name: d.value for d in report.decisions} == {"precision": "bf16", "int8": "int8"}
