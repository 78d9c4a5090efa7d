"""Precision choice follows the hardware: bf16 only where it has a fast kernel."""

from __future__ import annotations

import pytest

from modelkiln import hardware
from modelkiln.errors import ConfigError


def test_auto_on_cpu_follows_the_bf16_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_precision("auto", "cpu") == "bf16"


def test_explicit_choices_pass_and_fp16_on_cpu_is_refused() -> None:
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="fp16' needs a CUDA GPU"):
        hardware.resolve_precision("fp16", "cpu")


def test_this_machine_answer_matches_its_cpu_flags() -> None:
    from modelkiln.doctor.probe import cpu_info

    flags = cpu_info().flags
    expected = bool(flags.get("amx_bf16") or flags.get("avx512_bf16"))
    assert hardware.cpu_has_fast_bf16() is expected


def test_torch_dtype() -> None:
    import torch

    assert hardware.torch_dtype("bf16") is torch.bfloat16
