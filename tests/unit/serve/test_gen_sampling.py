"""Sampling (greedy, temperature, top-k, top-p, seeds) and incremental detokenization + stops."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch

from modelkiln.config import TokenizerConfig
from modelkiln.data.tokenizer import train_tokenizer
from modelkiln.serve.generation.api import SamplingParams
from modelkiln.serve.generation.sampling import (
    IncrementalDetokenizer,
    is_greedy,
    make_generator,
    sample_tokens,
)

TEXTS = [
    "def add(x, y):\n    return x + y\n\n",
    "héllo wörld, ünïcode — 日本語のテキスト 🙂\n",
    "class Point:\n    pass\n\n# end\n",
]


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    return train_tokenizer(TEXTS * 20, TokenizerConfig(vocab_size=300))


def draw(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    return sample_tokens(logits, params, [make_generator(p) for p in params])


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=3)]
    assert all(is_greedy(p) and make_generator(p) is None for p in greedy)
    assert draw(logits[:2], greedy) == logits[:2].argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_p=0.9, seed=12),
        SamplingParams(temperature=1.0, top_k=20, seed=13),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.8, seed=14),
        SamplingParams(temperature=1.0, seed=15),
    ]
    batch = [draw(logits, params) for _ in range(2)]
    assert batch[0] == batch[1]
    for i, p in enumerate(params):  # same row alone, and in a reversed batch
        assert draw(logits[i : i + 1], [p]) == [batch[0][i]]
    assert draw(logits.flip(0), params[::-1]) == batch[0][::-1]
    other_seed = [draw(logits[:1], [SamplingParams(seed=s)])[0] for s in range(20)]
    assert len(set(other_seed)) > 1


def test_unseeded_streams_differ() -> None:
    logits = torch.zeros(1, 1000)
    assert len({draw(logits, [SamplingParams()])[0] for _ in range(10)}) > 1


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    counts = torch.bincount(torch.tensor(draw(logits, params)), minlength=3) / 4000
    assert torch.allclose(counts, probs, atol=0.03)
    cold = [SamplingParams(temperature=0.25, seed=s) for s in range(4000)]
    counts = torch.bincount(torch.tensor(draw(logits, cold)), minlength=3) / 4000
    assert counts[0] > 0.9  # p^(1/T) sharpens towards the argmax


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, 1.0]]).repeat(500, 1)
    top2 = draw(logits, [SamplingParams(top_k=2, seed=s) for s in range(500)])
    assert set(top2) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # ~0.36, 0.33, 0.30, ...: first two hold < 0.8
    nucleus = draw(logits, [SamplingParams(top_p=0.6, seed=s) for s in range(500)])
    assert set(nucleus) == {0, 1} and probs[:2].sum() >= 0.6
    tiny = draw(logits[:50], [SamplingParams(top_p=1e-6, seed=s) for s in range(50)])
    assert set(tiny) == {0}


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detok.push(t) for t in token_ids] + [detok.flush()]


def test_detokenizer_never_emits_half_a_utf8_character() -> None:
    tok = tokenizer()
    text = "héllo wörld — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    pieces = stream(IncrementalDetokenizer(tok, tok.encode("x = ")), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 3  # text flows as tokens arrive, not all at the end


def test_detokenizer_fast_decode_path_streams_what_the_wrapper_streams() -> None:
    """The Rust decode (no space clean-up) and transformers' decode give the same pieces."""
    tok = tokenizer()
    ids = [*tok.encode("héllo wörld — 日本語 🙂 def f(x):\n    return x"), tok.eos_token_id]
    fast = IncrementalDetokenizer(tok, tok.encode("x = "), stop=("return",))
    slow = IncrementalDetokenizer(tok, tok.encode("x = "), stop=("return",))
    slow._raw_decode = None  # force transformers' decode
    assert fast._raw_decode is not None  # this tokenizer takes the fast path
    assert stream(fast, ids) == stream(slow, ids)


def test_detokenizer_skips_special_tokens() -> None:
    tok = tokenizer()
    ids = [*tok.encode("abc"), tok.eos_token_id]
    assert "".join(stream(IncrementalDetokenizer(tok, []), ids)) == "abc"


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("def add(x):\n    return x\n\nclass A:", ("\n\n",), "def add(x):\n    return x"),
        ("def add(x):\n    return x\n\nclass A:", ("class", "return"), "def add(x):\n    "),
        ("héllo wörld — 日本語", ("日本",), "héllo wörld — "),
        ("no stop here\n", ("\n\n", "zzz"), "no stop here\n"),
        ("stop at start", ("stop",), ""),
    ],
)
def test_stop_strings_are_trimmed_and_never_streamed(
    text: str, stops: tuple[str, ...], expected: str
) -> None:
    tok = tokenizer()
    detok = IncrementalDetokenizer(tok, [], stops)
    pieces, emitted = [], ""
    for token in tok.encode(text):
        piece = detok.push(token)
        emitted += piece
        pieces.append(piece)
        assert not any(s in emitted for s in stops)  # never streamed, even partially done
        if detok.stopped:
            break
    emitted += detok.flush()
    assert emitted == expected
    assert detok.stopped == (expected != text)
    assert detok.push(tok.encode("x")[0]) == "" if detok.stopped else True


def test_held_back_tail_is_flushed_when_generation_ends_without_the_stop() -> None:
    tok = tokenizer()
    detok = IncrementalDetokenizer(tok, [], ("\n\n",))
    pieces = stream(detok, tok.encode("pass\n"))
    assert pieces[-1] == "\n" and "".join(pieces) == "pass\n"


def test_token_scores_only_for_the_rows_that_ask() -> None:
    import torch

    from modelkiln.serve.generation.sampling import token_scores

    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, -torch.inf, 0.0], [1.0, 1.0, 1.0]])
    scores = token_scores(logits, [2, 0, 1], [True, True, False])
    assert scores[2] is None
    (lp0, h0), (lp1, h1) = scores[0], scores[1]  # type: ignore[misc]
    ref = torch.log_softmax(logits[0], -1)
    entropy = -(ref.exp() * ref).sum().item()
    assert lp0 == pytest.approx(ref[2].item(), abs=1e-6) and h0 == pytest.approx(entropy, abs=1e-6)
    p = torch.softmax(torch.tensor([5.0, 0.0]), -1)
    assert lp1 == pytest.approx(p[0].log().item(), abs=1e-6)
    assert h1 == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)  # -inf adds no entropy
