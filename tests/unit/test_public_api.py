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


def test_contract_names_are_pinned() -> None:
    from modelkiln import contract

    assert (contract.TRAIN_JSON, contract.VARIANT_JSON, contract.EVAL_CARD, contract.KV_ONNX) == (
        "train.json", "variant.json", "eval_card.json", "model_kv.onnx"
    )  # fmt: skip
    for name in contract.__all__:
        assert getattr(contract, name) is not None


def test_core_and_contract_import_no_heavy_library_and_no_stage() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import modelkiln.config, modelkiln.stages, modelkiln.contract, modelkiln.kvgraph\n"
        "import modelkiln.contract.corpus, modelkiln.contract.hfmodel, modelkiln.contract.merge\n"
        "import modelkiln.contract.codesearch, modelkiln.onnxexport, modelkiln.stats\n"
        "heavy = {'torch', 'transformers', 'datasets', 'onnxruntime'} & set(sys.modules)\n"
        "stages = [m for m in sys.modules if m.split('.')[:2][-1] in\n"
        "          {'data', 'train', 'optimize', 'serve', 'pipeline'}]\n"
        "print(sorted(heavy), stages)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
