"""KV-cache ONNX export of causal LMs: graph signature, parity with PyTorch's own cache at prefill
and at every decode step, greedy generation equal to ``model.generate``, quantized KV graphs."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
np = pytest.importorskip("numpy")
onnx = pytest.importorskip("onnx")

import opt_helpers as h  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.optimize.api import build_variant  # noqa: E402
from modelkiln.optimize.export import compare_outputs  # noqa: E402
from modelkiln.optimize.kv_export import (  # noqa: E402
    KV_ONNX,
    OrtKvGenerator,
    cache_shape,
    check_kv_parity,
    export_kv_onnx,
    kv_parity_prompts,
)
from modelkiln.optimize.registry import BuildContext  # noqa: E402
from modelkiln.optimize.runners import load_torch_model, synthetic_batch  # noqa: E402


def make_llama(path: Path) -> Path:
    """A 2-layer, 32-wide random Llama with grouped-query attention (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=h.VOCAB, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


LMS = {"gpt2": h.make_gpt2, "llama": make_llama}


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {name: make(root / name) for name, make in LMS.items()}


@pytest.mark.parametrize("name", list(LMS))
def test_kv_graph_matches_torch_cache_every_step_and_greedy_generate(
    name: str, lms: dict[str, Path], tmp_path: Path
) -> None:
    spec = h.spec_of(lms[name])
    model = load_torch_model(spec)
    path = tmp_path / KV_ONNX

    outputs = export_kv_onnx(model, spec, path)

    shape = cache_shape(model.config)
    assert outputs[0] == "logits" and len(outputs) == 1 + 2 * shape.layers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past_key_values")}
    assert past["past_key_values.0.key"] == ["batch", shape.heads, "past_sequence", shape.head_dim]
    for prompt in kv_parity_prompts(spec):  # batch 1 and batch 2, two lengths
        report = check_kv_parity(model, path, prompt, steps=4, atol=1e-4, max_new_tokens=10)
        assert len(report.max_abs) == 5, report.to_dict()  # prefill + 4 decode steps
        assert report.ok, report.to_dict()


@pytest.mark.parametrize("name", list(LMS))
def test_kv_graph_left_padded_rows_match_unpadded_runs(
    name: str, lms: dict[str, Path], tmp_path: Path
) -> None:
    """Rows of different lengths, left-padded into one batch, give each row's own logits."""
    spec = h.spec_of(lms[name])
    export_kv_onnx(load_torch_model(spec), spec, tmp_path / KV_ONNX)
    gen = OrtKvGenerator(tmp_path / KV_ONNX)
    short, long = (p.numpy()[0] for p in kv_parity_prompts(spec, lengths=(4, 9)))
    width = len(long)
    ids = np.zeros((2, width), dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    ids[0, width - len(short) :], mask[0, width - len(short) :] = short, 1
    ids[1], mask[1] = long, 1

    batched, past = gen.step(ids, mask, gen.empty_past(2))
    nxt = batched[:, -1].argmax(-1)[:, None]
    mask2 = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    batched2, _ = gen.step(nxt, mask2, past)

    for row, prompt in enumerate((short, long)):
        alone, alone_past = gen.step(prompt[None], np.ones((1, len(prompt)), np.int64),
                                     gen.empty_past(1))  # fmt: skip
        np.testing.assert_allclose(batched[row], alone[0], atol=1e-4)
        alone2, _ = gen.step(nxt[row : row + 1], np.ones((1, len(prompt) + 1), np.int64),
                             alone_past)  # fmt: skip
        np.testing.assert_allclose(batched2[row], alone2[0], atol=1e-4)


def test_kv_generator_stops_at_eos(lms: dict[str, Path], tmp_path: Path) -> None:
    spec = h.spec_of(lms["gpt2"])
    model = load_torch_model(spec)
    export_kv_onnx(model, spec, tmp_path / KV_ONNX)
    gen = OrtKvGenerator(tmp_path / KV_ONNX)
    prompt = kv_parity_prompts(spec, lengths=(6,))[0].numpy()

    free = gen.generate(prompt, max_new_tokens=6)
    first = int(free[0, 6])
    stopped = gen.generate(prompt, max_new_tokens=6, eos_token_id=first)

    assert free.shape == (1, 12)
    assert stopped.shape == (1, 7) and int(stopped[0, -1]) == first


def test_kv_export_refuses_an_encoder(tmp_path: Path) -> None:
    spec = h.spec_of(h.make_bert(tmp_path / "bert"))
    with pytest.raises(ConfigError, match="causal LM"):
        export_kv_onnx(load_torch_model(spec), spec, tmp_path / KV_ONNX)


@pytest.mark.parametrize(
    "variant", ["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "onnx-int4-weight"]
)
def test_quantized_variants_ship_a_quantized_kv_graph_that_generates(
    variant: str, lms: dict[str, Path], tmp_path: Path
) -> None:
    spec = h.spec_of(lms["llama"])
    model = load_torch_model(spec)
    samples = [synthetic_batch(spec, 2, 16, seed=20 + i) for i in range(3)]
    ctx = BuildContext(spec, model, h.fast_config(), samples, [])

    built = build_variant(variant, ctx, tmp_path / variant, samples[:1])

    assert built.info["kv_cache"] is True
    kv = built.path / KV_ONNX
    ops = {n.op_type for n in onnx.load(str(kv)).graph.node}
    markers = {"onnx-int4-weight": "MatMulNBits", "onnx-int8-static": "QuantizeLinear",
               "onnx-int8-dynamic": "DynamicQuantizeLinear", "onnx-fp32": "MatMul"}  # fmt: skip
    assert markers[variant] in ops
    gen = OrtKvGenerator(kv)
    prompt = samples[0]["input_ids"][:1, :8]
    tokens = gen.generate(prompt.numpy(), max_new_tokens=5)
    assert tokens.shape == (1, 13) and np.array_equal(tokens[:, :8], prompt.numpy())
    # Prefill logits of the quantized KV graph stay close to the fp32 model's (lossy, SNR).
    logits, _ = gen.step(prompt.numpy(), np.ones_like(prompt.numpy()), gen.empty_past(1))
    with torch.inference_mode():
        ref = model(input_ids=prompt, use_cache=False).logits[:, -1:]
    check = compare_outputs("1x8", "logits", ref, torch.from_numpy(logits), built.variant.tolerance)
    assert check.ok, check.line()


def test_kv_cache_graph_can_be_turned_off(lms: dict[str, Path], tmp_path: Path) -> None:
    spec = h.spec_of(lms["gpt2"])
    samples = [synthetic_batch(spec, 2, 12, seed=1)]
    cfg = h.fast_config(quant={"kv_cache": False})
    built = build_variant(
        "onnx-int4-weight",
        BuildContext(spec, load_torch_model(spec), cfg, samples, []),
        tmp_path / "v",
        samples,
    )
    assert built.info["kv_cache"] is False and not (built.path / KV_ONNX).exists()
