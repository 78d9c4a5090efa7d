"""Static int8 (calibrated), QAT, int4 weight-only, edge export and TensorRT variants: what each
one writes, reloads and refuses, beyond the shared matrix (which runs all on BERT and GPT-2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torchao")

import opt_helpers as h  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.optimize.api import build_variant  # noqa: E402
from modelkiln.optimize.config import load_optimize_config  # noqa: E402
from modelkiln.optimize.export import check_parity, torch_outputs  # noqa: E402
from modelkiln.optimize.int4 import output_matmuls  # noqa: E402
from modelkiln.optimize.qat import convert_qat, prepare_qat  # noqa: E402
from modelkiln.optimize.registry import VARIANTS, BuildContext  # noqa: E402
from modelkiln.optimize.runners import load_torch_model, synthetic_batch  # noqa: E402
from modelkiln.optimize.tensorrt import TRT_PROVIDER  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"bert": h.make_bert(root / "bert"), "gpt2": h.make_gpt2(root / "gpt2")}


def _ctx(path: Path, samples: int = 2, train: int = 4, **cfg: Any) -> BuildContext:
    spec = h.spec_of(path)
    return BuildContext(
        spec,
        load_torch_model(spec),
        h.fast_config(**cfg),
        [synthetic_batch(spec, 2, 12, seed=5 + i, pad_last=True) for i in range(samples)],
        [synthetic_batch(spec, 4, 16, seed=10 + i) for i in range(train)],
    )


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _inputs(ctx: BuildContext) -> list[dict[str, Any]]:
    return [*ctx.samples, synthetic_batch(ctx.spec, 3, 20, seed=7)]


# --- static int8 ---------------------------------------------------------------------------------


def test_static_int8_without_calibration_data_is_a_config_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["bert"], samples=0, train=0)
    with pytest.raises(ConfigError, match="no calibration data") as info:
        build_variant("onnx-int8-static", ctx, tmp_path / "v", [])
    assert "onnx-int8-dynamic" in (info.value.hint or "")


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_calibration_methods_build_qdq_graphs_that_match(
    method: str, models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["bert"], quant={"calibration": {"method": method}})

    built = build_variant("onnx-int8-static", ctx, tmp_path / method, _inputs(ctx))

    assert built.parity.ok, built.parity.summary()
    assert built.info["calibration"] == method and built.info["calibration_batches"] == 4
    assert built.info["calibration_source"] == "train_batches"
    ops = _ops(built.path / "model.onnx")
    assert ops.count("QuantizeLinear") >= 4 and "DequantizeLinear" in ops
    # Only tensors around MatMul / Gemm are quantized; Softmax / LayerNorm see float inputs.
    graph = onnx.load(str(built.path / "model.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    dq_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            around = {producer.get(node.input[0], "")} | users.get(dq_of[node.output[0]], set())
            assert around & {"MatMul", "Gemm"}, node.name
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert not set(node.input) & set(dq_of.values()), node.name


@pytest.mark.parametrize("reduce_range", [True, False])
def test_static_int8_weights_use_7_bits_with_reduce_range(
    reduce_range: bool, models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["gpt2"], onnx={"reduce_range": reduce_range})
    built = build_variant("onnx-int8-static", ctx, tmp_path / "v", ctx.samples)
    graph = onnx.load(str(built.path / "model.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]  # fmt: skip
    peak = max(int(abs(w.astype(int)).max()) for w in weights)
    assert built.info["reduce_range"] is reduce_range
    assert peak <= 64 if reduce_range else peak > 64


def test_calibration_method_is_validated() -> None:
    with pytest.raises(ConfigError, match="method"):
        load_optimize_config({"quant": {"calibration": {"method": "kl"}}})


# --- QAT -----------------------------------------------------------------------------------------


def test_qat_without_training_batches_is_a_config_error(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["gpt2"], train=0)
    with pytest.raises(ConfigError, match="training batches"):
        build_variant("qat-int8", ctx, tmp_path / "v", ctx.samples)


def test_qat_prepare_fake_quantizes_linears_but_not_the_tied_head_and_convert_restores(
    models: dict[str, Path],
) -> None:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model = load_torch_model(h.spec_of(models["gpt2"]))
    prepare_qat(model, reduce_range=True)
    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fake) == 8  # 2 layers x (qkv, proj, fc, fc-proj); lm_head stays tied nn.Linear
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert fake[0].weight_fake_quantizer.config.dtype == torch.int7
    convert_qat(model)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def test_qat_trains_then_ships_dynamic_int8_of_the_trained_weights(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["gpt2"], quant={"qat": {"steps": 30, "lr": 3e-3}})

    built = build_variant("qat-int8", ctx, tmp_path / "v", _inputs(ctx))

    assert built.info["qat_steps"] == 30
    assert built.info["qat_loss_last"] < built.info["qat_loss_first"] - 0.1  # it learned
    trained = built.variant.parity_reference(ctx)
    assert trained is not ctx.reference
    assert built.parity.ok, built.parity.summary()  # int8 graph reproduces the trained model
    ops = _ops(built.path / "model.onnx")
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert output_matmuls(built.path / "model.onnx")  # lm_head left in fp32
    # The trained model differs from the source: the int8 graph follows the training.
    drift = check_parity(
        torch_outputs(ctx.reference, ["logits"]),
        torch_outputs(trained, ["logits"]),
        ctx.samples,
        h.EXACTISH,
    )
    assert not drift.ok
    assert VARIANTS.get("qat-int8")().not_default_here()


# --- int4 ----------------------------------------------------------------------------------------


def test_int4_is_unsupported_for_encoders(models: dict[str, Path]) -> None:
    reason = VARIANTS.get("onnx-int4-weight")().unsupported(h.spec_of(models["bert"]))
    assert reason and "causal" in reason


@pytest.mark.parametrize("with_head", [False, True])
def test_int4_replaces_weight_matmuls_and_keeps_the_head_unless_asked(
    with_head: bool, models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["gpt2"], quant={"int4": {"quantize_lm_head": with_head}, "kv_cache": False})

    built = build_variant("onnx-int4-weight", ctx, tmp_path / "v", _inputs(ctx))

    assert built.parity.ok, built.parity.summary()
    ops = _ops(built.path / "model.onnx")
    assert ops.count("MatMulNBits") == 8 + int(with_head)
    assert "Gemm" not in ops  # GPT-2 Conv1D was swapped for Linear before export
    assert bool(output_matmuls(built.path / "model.onnx")) is not with_head


# --- edge export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["torch-export", "torchscript"])
def test_edge_programs_reload_with_plain_torch_on_new_shapes(
    variant: str, models: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(models["gpt2"])
    built = build_variant(variant, ctx, tmp_path / "v", ctx.samples)
    file = built.path / VARIANTS.get(variant).weights_file  # type: ignore[attr-defined]
    program = (torch.export.load(str(file)).module() if variant == "torch-export"
               else torch.jit.load(str(file)))  # fmt: skip

    for batch in (synthetic_batch(ctx.spec, 5, 33, seed=9), synthetic_batch(ctx.spec, 1, 3)):
        with torch.inference_mode():
            got = program(batch["input_ids"], batch["attention_mask"])[0]
            ref = ctx.reference(**batch, use_cache=False).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


# --- TensorRT ------------------------------------------------------------------------------------


def test_tensorrt_says_why_it_cannot_run_without_the_provider(models: dict[str, Path]) -> None:
    reason = VARIANTS.get("onnx-tensorrt")().unsupported(h.spec_of(models["bert"]))
    if TRT_PROVIDER in ort.get_available_providers() and torch.cuda.is_available():
        assert reason is None
    else:
        assert reason and ("TensorRT" in reason or "CUDA" in reason)


@pytest.mark.gpu
def test_tensorrt_builds_and_matches_on_gpu(models: dict[str, Path], tmp_path: Path) -> None:
    if TRT_PROVIDER not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with TensorRT is not installed")
    ctx = _ctx(models["bert"])
    built = build_variant("onnx-tensorrt", ctx, tmp_path / "v", _inputs(ctx))
    assert built.parity.ok, built.parity.summary()
    assert any((built.path / "trt_cache").iterdir())  # the engine was built and cached
