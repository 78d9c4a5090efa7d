"""The traced torch encoder (TorchScript, no GIL inside the forward pass) answers exactly as
eager does, on padded and unpadded batches of any shape; an untraceable model runs eager."""

from __future__ import annotations

import random

import numpy as np
import pytest
from http_helpers import tiny_encoder_dir

from modelkiln.serve.encoders import TorchEncoderBackend, trace_encoder


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_traced_vectors_equal_eager_on_mixed_lengths(precision: str) -> None:
    eager = TorchEncoderBackend.from_path(tiny_encoder_dir(), precision=precision)  # type: ignore[arg-type]
    traced = TorchEncoderBackend.from_path(tiny_encoder_dir(), precision=precision, trace=True)  # type: ignore[arg-type]
    assert traced._traced is not None and eager._traced is None
    rng = random.Random(0)
    vocab = int(eager.model.config.vocab_size)
    for lengths in ([5], [3, 17, 9], [30] * 4, [2, 64, 1, 33, 12]):
        batch = [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]
        want, got = eager.encode(batch), traced.encode(batch)
        assert got.shape == (len(lengths), eager.dim)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # one at a time (no padding) as well: the padded batch row equals the lone input
        alone = np.stack([traced.encode([seq])[0] for seq in batch])
        np.testing.assert_allclose(got, alone, atol=2e-2 if precision == "bf16" else 1e-5)


def test_a_model_that_cannot_be_traced_runs_eager() -> None:
    class Untraceable:
        class config:  # mimics a transformers config attribute
            vocab_size = 100

        def parameters(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("no parameters")

    assert trace_encoder(Untraceable(), 0) is None
