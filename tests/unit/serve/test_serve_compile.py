"""``compile: true``: the torch encoder through torch.compile gives the eager model's vectors;
causal LMs refuse the flag with a hint."""

from __future__ import annotations

import numpy as np
import pytest
from http_helpers import tiny_encoder_dir

from modelkiln.errors import ServingError
from modelkiln.serve.config import ModelSpec, ServeConfig
from modelkiln.serve.encoders import TorchEncoderBackend
from modelkiln.serve.loading import load_engine


def test_compiled_encoder_matches_eager_on_several_shapes() -> None:
    eager = TorchEncoderBackend.from_path(tiny_encoder_dir(), "fp32", "cpu")
    compiled = TorchEncoderBackend.from_path(tiny_encoder_dir(), "fp32", "cpu", compile=True)
    assert compiled.compiled and not eager.compiled
    tok = eager.tokenizer
    for texts in (["def add(x, y):", "a"], ["class A:", "hello world a b c", "x"]):
        ids = tok(texts)["input_ids"]
        np.testing.assert_allclose(compiled.encode(ids), eager.encode(ids), atol=1e-5)


def test_compile_is_refused_for_causal_lms() -> None:
    spec = ModelSpec(path=tiny_encoder_dir(), kind="causal_lm", compile=True)
    cfg = ServeConfig(models=[spec])
    with pytest.raises(ServingError, match="compile: true is not supported") as err:
        load_engine(spec, cfg, lambda stats: None)
    assert err.value.hint and "encoder" in err.value.hint
