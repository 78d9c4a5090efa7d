"""Tiny seeded models and cheap quality metrics for the optimize tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modelkiln.optimize.config import OptimizeConfig, Tolerance
from modelkiln.optimize.gate import QualityMetric
from modelkiln.optimize.runners import ModelInfo, inspect_model, synthetic_batch

VOCAB = 256
EXACTISH = Tolerance(atol=1e-5, rtol=1e-4)
"""The same weights through the same library: equal up to float reassociation."""
FAST_BENCH: dict[str, Any] = {
    "batch_sizes": [1, 4],
    "seq_lengths": [16],
    "warmup": 1,
    "min_runs": 2,
    "max_runs": 4,
    "max_seconds": 0.5,
    "threads": 1,
}


def make_bert(path: Path) -> Path:
    """A 2-layer, 32-wide random BERT encoder saved with ``save_pretrained``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    return path


def make_gpt2(path: Path) -> Path:
    """A 2-layer, 32-wide random GPT-2 LM (Conv1D blocks, tied lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def agreement_metric(spec: ModelInfo) -> QualityMetric:
    """Mean cosine of a runner's outputs to the first runner measured (the baseline): 1.0 = same.

    Stands in for a held-out metric on random tiny models; higher is better.
    """
    batch = synthetic_batch(spec, 4, 24, seed=3, pad_last=True)
    ref: dict[str, torch.Tensor] = {}

    def run(runner: Any) -> float:
        out = runner(**batch).main.flatten(1)
        ref.setdefault("baseline", out)
        return float(torch.nn.functional.cosine_similarity(out, ref["baseline"]).mean())

    samples = [synthetic_batch(spec, 2, 12, seed=5, pad_last=True)]
    return QualityMetric("agreement", run, True, samples)


def fast_config(**overrides: Any) -> OptimizeConfig:
    """An OptimizeConfig with a tiny benchmark (and few distillation steps)."""
    data: dict[str, Any] = {"bench": dict(FAST_BENCH), "distill": {"steps": 4}}
    data.update(overrides)
    return OptimizeConfig.model_validate(data)


def spec_of(path: Path) -> ModelInfo:
    """The spec of a model directory."""
    return inspect_model(path)


def word_tokenizer() -> Any:
    """A whitespace word-level fast tokenizer over a tiny vocabulary (ids < VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to add sum list return value number file path open read write sort"
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words.split(" "))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
