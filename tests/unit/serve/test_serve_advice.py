"""The load-time hint towards the faster engine (causal LMs that ``auto`` put on torch)."""

from __future__ import annotations

import logging

import pytest

from modelkiln.serve.advice import faster_engine_hint, log_faster_engine_hint
from modelkiln.serve.config import ModelSpec


def test_hint_names_both_ways_to_the_onnx_engine(caplog: pytest.LogCaptureFixture) -> None:
    spec = ModelSpec(path="runs/x/train/model", name="gpt")
    with caplog.at_level(logging.INFO, logger="modelkiln.serve"):
        log_faster_engine_hint(spec, "causal_lm", "torch")
    (record,) = caplog.records
    assert "--backend onnx" in record.message
    assert "kiln optimize model runs/x/train/model" in record.message


def test_no_hint_when_the_user_chose_or_it_is_not_a_torch_causal_lm() -> None:
    assert faster_engine_hint(ModelSpec(path="m", backend="torch"), "causal_lm", "torch") is None
    assert faster_engine_hint(ModelSpec(path="m"), "causal_lm", "onnx") is None
    assert faster_engine_hint(ModelSpec(path="m"), "encoder", "torch") is None
