"""ONNX export: parity against PyTorch on every output and input case, every mismatch reported at
once, and one clear line for an architecture the export cannot handle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import opt_helpers as h  # noqa: E402

from modelkiln.errors import ArtifactError, ConfigError, StageError  # noqa: E402
from modelkiln.optimize.export import export_onnx, optimize_graph, validate_onnx  # noqa: E402
from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    model_dir = h.make_bert(root / "bert")
    spec = inspect_model(model_dir)
    names = export_onnx(load_torch_model(spec), spec, root / "model.onnx")
    assert names == ["last_hidden_state", "pooler_output"]
    return model_dir, root / "model.onnx"


def _cases(model_dir: Path) -> list[dict[str, torch.Tensor]]:
    spec = inspect_model(model_dir)
    padded = synthetic_batch(spec, 3, 19, seed=2, pad_last=True)
    return [synthetic_batch(spec, 1, 5, seed=1), padded]


def test_export_matches_pytorch_on_every_output_and_shape(exported: tuple[Path, Path]) -> None:
    model_dir, onnx_path = exported
    report = validate_onnx(load_torch_model(inspect_model(model_dir)), onnx_path, _cases(model_dir))
    assert report.ok, report.summary()
    assert {(c.case, c.output) for c in report.checks} == {
        ("1x5", "last_hidden_state"), ("1x5", "pooler_output"),
        ("3x19+pad", "last_hidden_state"), ("3x19+pad", "pooler_output"),
    }  # fmt: skip
    assert report.max_abs < 1e-4


def test_optimized_graph_keeps_parity(exported: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, onnx_path = exported
    spec = inspect_model(model_dir)
    done = optimize_graph(onnx_path, tmp_path / "fused.onnx", spec, "fusion")
    assert done.startswith("fusion:bert")
    report = validate_onnx(load_torch_model(spec), tmp_path / "fused.onnx", _cases(model_dir))
    assert report.ok, report.summary()


def test_parity_reports_every_mismatch_at_once(exported: tuple[Path, Path]) -> None:
    model_dir, onnx_path = exported
    model = load_torch_model(inspect_model(model_dir))
    with torch.no_grad():  # the graph no longer matches this model: every output is off
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    report = validate_onnx(model, onnx_path, _cases(model_dir), atol=1e-4, rtol=1e-3)
    assert not report.ok
    assert len(report.mismatches) == 4  # 2 input cases x 2 outputs, none swallowed
    with pytest.raises(ArtifactError) as err:
        report.raise_if_failed("onnx-fp32")
    message = str(err.value)
    for case in ("1x5", "3x19+pad"):
        for output in ("last_hidden_state", "pooler_output"):
            assert f"{output} on {case}" in message


def test_shape_and_missing_outputs_are_mismatches() -> None:
    from modelkiln.optimize.config import Tolerance
    from modelkiln.optimize.export import compare_outputs

    tol = Tolerance(atol=1e-4)
    ref = torch.ones(2, 3)
    assert "shape" in compare_outputs("c", "x", ref, torch.ones(3, 2), tol).note
    assert compare_outputs("c", "x", ref, None, tol).note == "missing"
    assert compare_outputs("c", "x", ref, ref * float("nan"), tol).note == "NaN or inf"
    padded = torch.tensor([[1, 1, 0]])
    hidden = torch.zeros(1, 3, 4)
    other = hidden.clone()
    other[0, 2] = 9.0  # only the padded position differs: not compared
    assert compare_outputs("c", "h", hidden, other, tol, padded).ok


def test_encoder_decoder_is_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(ConfigError, match="T5ForConditionalGeneration is an encoder-decoder"):
        inspect_model(tmp_path / "t5")


def test_export_failure_is_one_clear_line(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, _ = exported
    spec = inspect_model(model_dir)

    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exporting the operator 'aten::frobnicate' is not supported\nmore")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(StageError) as err:
        export_onnx(load_torch_model(spec), spec, tmp_path / "x.onnx")
    assert "\n" not in str(err.value)
    assert "ONNX export cannot handle BertModel" in str(err.value)
    assert "aten::frobnicate" in str(err.value) and "torch-fp32" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("make", [h.make_bert, h.make_gpt2], ids=["bert", "gpt2"])
def test_dynamo_exporter_matches_pytorch(make: Callable[[Path], Path], tmp_path: Path) -> None:
    model_dir = make(tmp_path / "m")
    spec = inspect_model(model_dir)
    model = load_torch_model(spec)
    export_onnx(model, spec, tmp_path / "model.onnx", exporter="dynamo", opset=18)
    report = validate_onnx(model, tmp_path / "model.onnx", _cases(model_dir))
    assert report.ok, report.summary()
