"""Validated configuration: the pipeline config, assembled from the registered stages.

Precedence: model defaults < YAML file < ``--set a.b=value`` overrides < named
CLI flags. Every model forbids unknown keys, so a typo is an error that names
the field instead of a silently ignored setting.

:data:`PipelineConfig` has the run-wide fields of :class:`PipelineBase` plus one
section per stage in :data:`modelkiln.stages.STAGES` (each stage names its
config class there). It is built on first use, so importing this module imports
no stage: core stays below the stages.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["data.max_files=50"])
    >>> cfg.data.max_files
    50
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field, create_model, field_validator

from modelkiln.configbase import (
    KilnModel,
    apply_overrides,
    format_validation_error,
    load_section,
    parse_override,
    read_yaml,
)
from modelkiln.stages import STAGES, load_object, stage_names

if TYPE_CHECKING:
    # What type checkers see; at run time the class comes from the registry (see
    # pipeline_config()); tests/unit/test_config.py checks both list the same sections.
    from modelkiln.data.config import DataConfig, TokenizerConfig
    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.serve.stage import ServeStageConfig
    from modelkiln.train.config import TrainConfig

__all__ = [
    "KilnModel",
    "PipelineBase",
    "PipelineConfig",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "parse_override",
    "pipeline_config",
    "read_yaml",
]

# Section configs that used to live here; importable from here lazily (no stage import).
_SECTION_CONFIGS = {
    "DEFAULT_EXCLUDES": "modelkiln.data.config",
    "DataConfig": "modelkiln.data.config",
    "PairsConfig": "modelkiln.data.config",
    "TokenizerConfig": "modelkiln.data.config",
}


class PipelineBase(KilnModel):
    """The run-wide fields of a pipeline config (the stage sections are added per stage)."""

    run: str = Field(
        "quickstart",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: artifacts go to <runs_dir>/<run>/<stage>/.",
    )
    runs_dir: Path = Field(Path("runs"), description="Directory holding all runs.")
    seed: int = Field(0, description="Seed for every random choice in every stage.")
    stages: list[str] = Field(default_factory=stage_names, description="Stages to run, in order.")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str]) -> list[str]:
        known = stage_names()
        unknown = [s for s in value if s not in known]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(known)}")
        if len(set(value)) != len(value):
            raise ValueError("a stage is listed twice")
        return value

    @property
    def run_dir(self) -> Path:
        """The directory of this run."""
        return self.runs_dir / self.run


@functools.cache
def _build(names: tuple[str, ...]) -> type[PipelineBase]:
    sections: dict[str, Any] = {}
    for name in names:
        spec = STAGES[name]
        section = load_object(spec.config)
        sections[name] = (
            section,
            Field(default_factory=section, description=f"{spec.description} (stage {name!r})."),
        )
    model = create_model("PipelineConfig", __base__=PipelineBase, **sections)
    model.__module__ = __name__
    model.__doc__ = "A whole pipeline run: which stages, where, and each stage's config."
    return model


def pipeline_config() -> type[PipelineBase]:
    """The pipeline config class for the stages registered now (built once per stage set)."""
    return _build(tuple(STAGES))


if TYPE_CHECKING:

    class PipelineConfig(PipelineBase):
        """A whole pipeline run: which stages, where, and each stage's config."""

        data: DataConfig
        tokenizer: TokenizerConfig
        train: TrainConfig
        optimize: OptimizeConfig
        serve: ServeStageConfig


def __getattr__(name: str) -> Any:
    if name == "PipelineConfig":
        return pipeline_config()
    if name in _SECTION_CONFIGS:
        return load_object(f"{_SECTION_CONFIGS[name]}:{name}")
    raise AttributeError(f"module 'modelkiln.config' has no attribute {name!r}")


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
    return cast("PipelineConfig", load_section(pipeline_config(), path, overrides, named=named))
