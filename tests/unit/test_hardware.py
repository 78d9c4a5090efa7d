"""Precision and int8 decisions: measured here, cached per machine, overridable per CPU class."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from modelkiln import hardware
from modelkiln.errors import ConfigError

EXPECTED = {  # class -> (precision auto, int8), as PLATFORM.md's figures decide them
    "avx2": ("fp32", "fp32"),
    "avx512_bf16": ("bf16", "int8"),
    "amx": ("bf16", "int8"),
}


@pytest.mark.parametrize("cpu", list(EXPECTED))
def test_each_class_decides_as_that_class_would(
    cpu: str, fake_cpu_class: Callable[[str], None]
) -> None:
    fake_cpu_class(cpu)
    precision, int8 = hardware.precision_decision("auto", "cpu"), hardware.int8_decision()
    assert (precision.value, int8.value) == EXPECTED[cpu]
    assert precision.source == "assumed" and f"assumed from class {cpu}" in precision.reason
    assert hardware.resolve_precision("auto", "cpu") == EXPECTED[cpu][0]
    assert hardware.cpu_class() == cpu
    assert hardware.cpu_has_fast_bf16() is (cpu != "avx2")


def test_the_override_reaches_the_probe(fake_cpu_class: Callable[[str], None]) -> None:
    from modelkiln.doctor.probe import cpu_info

    fake_cpu_class("avx2")
    info = cpu_info()
    assert info.flags_source == "override" and info.cpu_class == "avx2"
    assert info.flags["avx2"] and not info.flags["avx512_bf16"] and not info.flags["amx_bf16"]
    fake_cpu_class("amx")
    assert cpu_info().flags["amx_bf16"] is True


def test_an_unknown_class_is_refused(fake_cpu_class: Callable[[str], None]) -> None:
    fake_cpu_class("avx9000")
    with pytest.raises(ConfigError, match="avx9000"):
        hardware.cpu_class_override()


def test_explicit_choices_pass_and_fp16_on_cpu_is_refused() -> None:
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"
    assert hardware.precision_decision("fp32", "cpu").source == "explicit"
    with pytest.raises(ConfigError, match="fp16' needs a CUDA GPU"):
        hardware.resolve_precision("fp16", "cpu")


def test_rule_needs_speed_and_accuracy() -> None:
    slow = {"fp32": 100.0, "bf16": 110.0, "bf16_rel_error": 2e-3}
    assert hardware._speed_decision("precision", "bf16", slow, "measured").value == "fp32"
    fast = {"fp32": 100.0, "bf16": 250.0, "bf16_rel_error": 2e-3}
    assert hardware._speed_decision("precision", "bf16", fast, "measured").value == "bf16"
    wrong = {"fp32": 100.0, "bf16": 250.0, "bf16_rel_error": 0.2}
    d = hardware._speed_decision("precision", "bf16", wrong, "measured")
    assert d.value == "fp32" and "error" in d.reason
    none = {"fp32": 100.0, "int8": None}
    assert hardware._speed_decision("int8", "int8", none, "measured").value == "fp32"


def test_this_machine_is_measured_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(hardware.CPU_CLASS_ENV, raising=False)
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))
    hardware.clear_caches()
    first = hardware.precision_decision("auto", "cpu")
    assert first.source == "measured" and first.value in ("fp32", "bf16")
    assert first.speedup is not None and first.speedup > 0
    stored = json.loads((tmp_path / "hardware.json").read_text())
    (entry,) = stored.values()
    assert entry["fp32"] > 0 and entry["bf16"] > 0
    # The rule, applied to what was measured: no flag is consulted.
    fast = entry["bf16"] / entry["fp32"] >= hardware.MIN_SPEEDUP
    assert (first.value == "bf16") is (fast and entry["bf16_rel_error"] <= 1e-2)
    hardware.clear_caches()  # a new process: reads the file, does not time again
    entry["fp32"], entry["bf16"] = 100.0, 1.0
    (tmp_path / "hardware.json").write_text(json.dumps(stored))
    again = hardware.precision_decision("auto", "cpu")
    assert again.value == "fp32" and "cached" in again.reason
    hardware.clear_caches()


def test_the_model_s_own_matmul_is_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hardware.CPU_CLASS_ENV, raising=False)
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "cache"))
    hardware.clear_caches()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"n_embd": 72, "n_inner": None}))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"hidden_size": 384, "intermediate_size": 1536})
    )
    # GPT-2's n_inner None means 4x; dims round up to 16 and clip to SHAPE_LIMITS.
    assert hardware.model_matmul_shape(tmp_path / "gpt2") == (256, 80, 288)
    assert hardware.model_matmul_shape(tmp_path / "bert") == (256, 384, 1536)
    assert hardware.model_matmul_shape(tmp_path / "missing") is None
    assert hardware.matmul_shape(8192, 16) == (256, 4096, 64)
    decision = hardware.precision_decision("auto", "cpu", (256, 384, 1536))
    assert "256x384x1536" in decision.reason
    stored = json.loads((tmp_path / "cache" / "hardware.json").read_text())
    assert [entry["shape"] for entry in stored.values()] == [[256, 384, 1536]]
    hardware.clear_caches()


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hardware.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.cache_dir() == tmp_path / "modelkiln"
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "x"))
    assert hardware.cache_dir() == tmp_path / "x"


def test_torch_dtype() -> None:
    import torch

    assert hardware.torch_dtype("bf16") is torch.bfloat16


@pytest.mark.parametrize("cpu", list(EXPECTED))
def test_optimize_tries_bf16_and_int8_where_the_class_makes_them_faster(
    cpu: str, fake_cpu_class: Callable[[str], None]
) -> None:
    pytest.importorskip("torch")
    from modelkiln.optimize.registry import VARIANTS

    fake_cpu_class(cpu)
    bf16, int8 = EXPECTED[cpu]
    skip_bf16 = VARIANTS.get("torch-bf16")().not_default_here()
    skip_int8 = VARIANTS.get("torch-int8-dynamic")().not_default_here()
    assert (skip_bf16 is None) is (bf16 == "bf16")
    assert (skip_int8 is None) is (int8 == "int8")
    for reason in (skip_bf16, skip_int8):
        assert reason is None or "assumed from class avx2" in reason


def test_bf16_is_kept_only_while_the_model_output_stays_within_tolerance() -> None:
    torch = pytest.importorskip("torch")

    class Cancels(torch.nn.Module):
        """(x + 1000) - 1000: bf16 loses x in the rounding of the big sum."""

        def __init__(self) -> None:
            super().__init__()
            self.big = torch.nn.Parameter(torch.tensor(1000.0))

        def forward(self, input_ids: object) -> tuple[object]:
            x = torch.as_tensor(input_ids).to(self.big.dtype)
            return ((x + self.big) - self.big,)

    auto = hardware.Decision("precision", "bf16", "measured 2.3x", "measured", 2.3)
    inputs = {"input_ids": torch.arange(5, 21).unsqueeze(0)}
    bad = hardware.confirm_bf16_output(auto, Cancels(), inputs)
    assert bad.value == "fp32" and "model output error" in bad.reason

    class Healthy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16))

        def forward(self, input_ids: object) -> tuple[object]:
            return (self.net(input_ids),)

    good = hardware.confirm_bf16_output(auto, Healthy(), inputs)
    assert good.value == "bf16" and "<=" in good.reason
    explicit = hardware.Decision("precision", "bf16", "set in the config", "explicit")
    assert hardware.confirm_bf16_output(explicit, Cancels(), inputs) is explicit
