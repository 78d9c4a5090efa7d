"""The shared matrix: every registered variant x {tiny BERT encoder, tiny GPT-2 LM} builds, saves,
reloads with plain transformers / onnxruntime (or load_variant where transformers cannot rebuild
the module tree), and matches the fp32 reference within that variant's stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torchao")

import opt_helpers as h  # noqa: E402

from modelkiln.optimize.api import build_variant  # noqa: E402
from modelkiln.optimize.export import check_parity, compare_outputs, torch_outputs  # noqa: E402
from modelkiln.optimize.quantize import load_variant  # noqa: E402
from modelkiln.optimize.registry import VARIANTS, BuildContext  # noqa: E402
from modelkiln.optimize.runners import auto_class, load_torch_model, synthetic_batch  # noqa: E402

MODELS = {"bert": h.make_bert, "gpt2": h.make_gpt2}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make(root / name) for name, make in MODELS.items()}


def _reload(path: Path, info: dict[str, Any]) -> Any:
    """A function batch -> {output: tensor} using the plain library, not modelkiln's runner."""
    if info["format"] == "onnx":
        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}

        def run_onnx(batch: dict[str, Any]) -> dict[str, Any]:
            feed = {k: v.numpy() for k, v in batch.items() if k in inputs}
            outs = session.run(None, feed)
            return {n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)}

        return run_onnx
    if info["format"] == "torch-export":
        program = torch.export.load(str(path / "model.pt2")).module()
        return _program_outputs(program, info)
    if info["format"] == "torchscript":
        return _program_outputs(torch.jit.load(str(path / "model.pt")), info)
    if info["format"] == "torchao-linear":  # Conv1D swapped for Linear: modelkiln's loader
        model = load_variant(path).model
    else:
        model = auto_class(info["task"]).from_pretrained(path).eval()
    main = "logits" if info["task"] == "causal-lm" else "last_hidden_state"
    return torch_outputs(model, [main])


def _program_outputs(program: Any, info: dict[str, Any]) -> Any:
    """A saved edge program (positional inputs, returns (main,)) as batch -> {main: tensor}."""
    main = "logits" if info["task"] == "causal-lm" else "last_hidden_state"

    def run(batch: dict[str, Any]) -> dict[str, Any]:
        with torch.inference_mode():
            return {main: program(*(batch[n] for n in info["input_names"]))[0]}

    return run


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("variant_name", VARIANTS.names())
def test_variant_builds_saves_reloads_and_matches(
    variant_name: str, model_name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    spec = h.spec_of(models[model_name])
    reference = load_torch_model(spec)
    samples = [synthetic_batch(spec, 2, 12, seed=5, pad_last=True)]
    train = [synthetic_batch(spec, 4, 16, seed=10 + i) for i in range(4)]
    ctx = BuildContext(spec, reference, h.fast_config(), samples, train)
    inputs = [*samples, synthetic_batch(spec, 1, 7, seed=6), synthetic_batch(spec, 3, 20, seed=7)]
    variant = VARIANTS.get(variant_name)
    reason = variant().unsupported(spec)
    if reason:
        pytest.skip(f"{variant_name} on {model_name}: {reason}")

    built = build_variant(variant_name, ctx, tmp_path / variant_name, inputs)

    assert built.parity.ok, built.parity.summary()
    info = json.loads((built.path / "variant.json").read_text())
    assert info["variant"] == variant_name and info["task"] == spec.task
    weights = getattr(variant, "weights_file", "") or (
        "model.onnx" if variant.backend == "onnxruntime" else "model.safetensors"
    )
    assert (built.path / weights).is_file() and (built.path / "config.json").is_file()
    if hasattr(variant, "layer_scheme"):
        rows = json.loads((built.path / "layer_error.json").read_text())
        assert rows and all(r["snr_db"] > 10 for r in rows)

    # Reload from disk with the plain libraries: same outputs, within the stated tolerance.
    reloaded = _reload(built.path, info)
    main = "logits" if spec.task == "causal-lm" else "last_hidden_state"
    # Pruning / distillation change the function on purpose: their own in-memory result.
    expected = built.variant.parity_reference(ctx)
    report = check_parity(torch_outputs(expected, [main]), reloaded, inputs, variant.tolerance)
    assert report.ok, report.summary()
    # And the reload equals what the pipeline's runner computed.
    runner_out = built.runner(**inputs[0]).main
    same = compare_outputs("x", main, runner_out, reloaded(inputs[0])[main], h.EXACTISH)
    assert same.ok, same.line()


def test_every_variant_states_a_tolerance_and_summary() -> None:
    for name in VARIANTS.names():
        variant = VARIANTS.get(name)
        assert variant.name == name
        assert variant.summary and variant.tolerance.describe()
        assert variant.family in ("baseline", "export", "quantization", "pruning", "distillation")
