"""Pin the public API: every exported name resolves, and the error tree is one tree."""

from __future__ import annotations

import pytest

import modelkiln
from modelkiln import errors


def test_exported_members() -> None:
    assert modelkiln.__all__ == [
        "__version__", "load_config", "PipelineConfig", "run_pipeline", "PipelineResult",
        "load_artifact", "Artifact", "run_doctor", "KilnError", "ConfigError", "ArtifactError",
        "DataError", "DependencyMissingError", "EnvironmentCheckError", "StageError",
        "QualityGateError", "ServingError",
    ]  # fmt: skip
    for name in modelkiln.__all__:
        assert getattr(modelkiln, name) is not None
    with pytest.raises(AttributeError):
        _ = modelkiln.nope


def test_every_error_is_a_kiln_error_with_hint() -> None:
    subclasses = [
        errors.ConfigError, errors.ArtifactError, errors.DataError, errors.EnvironmentCheckError,
        errors.StageError, errors.QualityGateError, errors.ServingError,
    ]  # fmt: skip
    for cls in subclasses:
        exc = cls("value 'x' is bad", hint="use 'y'")
        assert isinstance(exc, errors.KilnError)
        assert str(exc) == "value 'x' is bad — fix: use 'y'"
    missing = errors.DependencyMissingError("onnxruntime", "onnx", purpose="ONNX export")
    assert str(missing) == (
        "the Python package 'onnxruntime' is not installed (needed for ONNX export)"
        " — fix: pip install 'modelkiln[onnx]'"
    )


def test_require() -> None:
    errors.require("json", "dev")
    with pytest.raises(errors.DependencyMissingError, match="modelkiln\\[serve\\]"):
        errors.require("surely_not_a_module_xyz", "serve")
