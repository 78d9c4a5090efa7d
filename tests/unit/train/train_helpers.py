"""Tiny stand-ins for the data and tokenizer artifacts, and tiny train configs.

The corpus is real Python (a few stdlib modules, ~2,500 lines) under fake
top-level module names; the tokenizer is a 400-token byte-level BPE trained
here. Nothing depends on the data/tokenizer stages' modules.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from modelkiln.train.config import TrainConfig

SPECIALS = ["<|endoftext|>", "<pad>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
SPLITS = {
    "train": {"general": ["textwrap", "shlex", "fnmatch", "string", "base64"]},
    "validation": {"evalpkg": ["colorsys", "bisect", "heapq"]},
    "test": {"testpkg": ["keyword"]},
}
DOMAIN = {"domainpkg": ["json.decoder", "json.encoder", "json.scanner", "json", "glob"]}
VOCAB = 400


def _rows(groups: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = []
    for module, sources in groups.items():
        for name in sources:
            text = inspect.getsource(importlib.import_module(name))
            path = f"{module}/{name.replace('.', '_')}.py"
            rows.append(
                {
                    "path": path,
                    "module": module,
                    "text": text,
                    "n_lines": text.count("\n"),
                    "n_bytes": len(text.encode()),
                    "n_tokens": 0,
                }
            )
    return rows


def make_corpus(root: Path) -> Path:
    """A data-artifact-like folder with ``corpus/`` (train holds the domain package)."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for split, groups in SPLITS.items():
        rows = _rows(groups) + (_rows(DOMAIN) if split == "train" else [])
        splits[split] = Dataset.from_list(sorted(rows, key=lambda r: r["path"]))
    data = root / "data"
    DatasetDict(splits).save_to_disk(str(data / "corpus"))
    return data


def make_tokenizer(root: Path, data: Path) -> Path:
    """A 400-token byte-level BPE in a tokenizer-artifact-like folder (``tokenizer/``)."""
    from datasets import load_from_disk
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = load_from_disk(str(data / "corpus"))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus["train"]["text"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=SPECIALS[0],
        bos_token=SPECIALS[0],
        pad_token=SPECIALS[1],
        model_max_length=512,
    )
    out = root / "tokenizer_artifact"
    tok.save_pretrained(str(out / "tokenizer"))
    return out


def tiny_config(
    method: dict[str, Any] | None = None,
    *,
    pretrain: dict[str, Any] | None = None,
    source: str = "scratch",
    architecture: str = "llama",
    finetune: dict[str, Any] | None = None,
    train_tokens: int = 32 * 4 * 12,
    **top: Any,
) -> TrainConfig:
    """A seconds-long config: tiny model, 32-token blocks, a dozen steps."""
    loop = {
        "batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "eval_steps": 6,
        "save_steps": 6,
        "logging_steps": 1,
        "schedule": "constant",
    }
    raw: dict[str, Any] = {
        "model": {"source": source, "architecture": architecture, "size": "tiny"},
        "data": {
            "block_size": 32,
            "domain_modules": ["domainpkg"],
            "domain_eval_fraction": 0.3,
            "max_train_tokens": train_tokens,
            "max_eval_tokens": 32 * 12,
        },
        "pretrain": {"enabled": False, **loop, **(pretrain or {})},
        "finetune": {
            **loop,
            "max_steps": 12,
            "method": method or {"method": "lora", "r": 4, "alpha": 8},
            **(finetune or {}),
        },
        "precision": "fp32",
        **top,
    }
    return TrainConfig.model_validate(raw)


_CACHE: dict[str, tuple[Path, Path]] = {}


def shared_inputs() -> tuple[Path, Path]:
    """(data dir, tokenizer dir) built once per test process in a temporary folder."""
    if "inputs" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="kiln-train-test-"))
        atexit.register(shutil.rmtree, root, True)
        data = make_corpus(root)
        _CACHE["inputs"] = (data, make_tokenizer(root, data))
    return _CACHE["inputs"]


def capture_callback() -> Any:
    """A TrainerCallback keeping the trained model (after the best checkpoint is loaded)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        model: Any = None

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.model = kw["model"]

    return Capture()


def probe_ids(vocab: int = VOCAB, length: int = 24) -> Any:
    """A fixed batch of token ids for logit comparisons."""
    import torch

    return torch.randint(5, vocab, (2, length), generator=torch.Generator().manual_seed(1))
