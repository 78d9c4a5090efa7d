"""Knowledge distillation on tiny models: losses, student init, progressive stages, save/reload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import opt_helpers as h  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.optimize.api import build_variant  # noqa: E402
from modelkiln.optimize.distill import DistillConfig, default_layer_map  # noqa: E402
from modelkiln.optimize.distill.core import (  # noqa: E402
    distill,
    num_layers,
    progressive_distill,
    student_from_teacher,
)
from modelkiln.optimize.registry import BuildContext  # noqa: E402
from modelkiln.optimize.runners import auto_class, load_torch_model, synthetic_batch  # noqa: E402


def _bert(path: Path, layers: int = 4) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=h.VOCAB, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     initializer_range=0.3)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    return path


def _gpt2(path: Path, layers: int = 4) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=h.VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0, initializer_range=0.3)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _llama(path: Path, layers: int = 4) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=h.VOCAB, hidden_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                      initializer_range=0.3)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


MAKERS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {name: make(root / name) for name, make in MAKERS.items()}


def _ctx(path: Path, n_train: int = 4, **distill: Any) -> BuildContext:
    spec = h.spec_of(path)
    samples = [synthetic_batch(spec, 2, 12, seed=5, pad_last=True)]
    train = [synthetic_batch(spec, 4, 16, seed=10 + i, pad_last=True) for i in range(n_train)]
    cfg = h.fast_config(distill={"steps": 4, **distill})
    return BuildContext(spec, load_torch_model(spec), cfg, samples, train)


LOSSES: dict[str, tuple[str, dict[str, Any]]] = {
    "hidden-mse": ("bert", {"hidden_loss": "mse", "pooled_weight": 0.0}),
    "hidden-cosine": ("bert", {"hidden_loss": "cosine", "pooled_weight": 0.0}),
    "pooled": ("bert", {"hidden_weight": 0.0, "pooled_weight": 1.0}),
    "attention": ("bert", {"hidden_weight": 0.0, "pooled_weight": 0.0, "attention_weight": 1.0}),
    "logit-kd": ("gpt2", {"hidden_weight": 0.0, "alpha": 1.0}),
    "logit-kd+lm": ("llama", {"hidden_weight": 0.0, "alpha": 0.5}),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_each_loss_decreases_over_a_few_steps(loss: str, teachers: dict[str, Path]) -> None:
    model, weights = LOSSES[loss]
    ctx = _ctx(teachers[model], n_train=2)
    cfg = DistillConfig(student_layers=2, steps=12, lr=3e-3, warmup_ratio=0.0, **weights)
    result = distill(ctx.reference, ctx.train_batches, cfg, causal=model != "bert")

    term = loss.split("-")[0]
    curve = [row[term] for row in result.losses]
    assert len(curve) == 12 and all(v >= 0 for v in curve)
    # Same two batches cycled: the loss on each batch must fall (even vs even, odd vs odd).
    assert curve[-2] < curve[0] and curve[-1] < curve[1], curve
    assert set(result.losses[0]) == {"total", term}


def test_every_loss_at_once_and_a_narrower_scratch_student(teachers: dict[str, Path]) -> None:
    ctx = _ctx(teachers["bert"], n_train=2)
    cfg = DistillConfig(init="scratch", student_layers=1, student_hidden_size=16, steps=10,
                        lr=3e-3, warmup_ratio=0.0, attention_weight=1.0)  # fmt: skip
    result = distill(ctx.reference, ctx.train_batches, cfg, causal=False)

    student: Any = result.student
    assert student.config.hidden_size == 16 and num_layers(student) == 1
    assert result.layer_map == [3]
    assert set(result.losses[0]) == {"total", "hidden", "pooled", "attention"}
    assert result.losses[-2]["total"] < result.losses[0]["total"]


def test_layer_init_copies_the_mapped_teacher_layers(teachers: dict[str, Path]) -> None:
    assert default_layer_map(6, 3) == [1, 3, 5]
    assert default_layer_map(6, 4) == [1, 2, 4, 5]
    assert default_layer_map(4, 1) == [3]
    for name, stack in (("bert", "encoder.layer"), ("gpt2", "transformer.h"),
                        ("llama", "model.layers")):  # fmt: skip
        teacher: Any = load_torch_model(h.spec_of(teachers[name]))
        student: Any = student_from_teacher(teacher, [0, 2])
        t_layers: Any = teacher.get_submodule(stack)
        s_layers: Any = student.get_submodule(stack)
        assert len(s_layers) == 2 and student.config.num_hidden_layers == 2
        for s_idx, t_idx in enumerate([0, 2]):
            t_state, s_state = t_layers[t_idx].state_dict(), s_layers[s_idx].state_dict()
            assert t_state.keys() == s_state.keys()
            assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
        emb_t, emb_s = teacher.get_input_embeddings(), student.get_input_embeddings()
        assert torch.equal(emb_t.weight, emb_s.weight) and emb_t.weight is not emb_s.weight
        idx = [
            m.layer_idx
            for m in s_layers.modules()
            if isinstance(getattr(m, "layer_idx", None), int)
        ]
        assert sorted(set(idx)) == [0, 1]  # KV-cache slots renumbered
        assert num_layers(teacher) == 4  # the teacher is untouched
    with pytest.raises(ConfigError, match="does not fit"):
        student_from_teacher(teacher, [1, 4])


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_student_has_the_configured_depth_and_reloads_identically(
    name: str, teachers: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(teachers[name], student_layers=2)
    inputs = [*ctx.samples, synthetic_batch(ctx.spec, 3, 20, seed=7)]
    built = build_variant("distill-layers", ctx, tmp_path / "student", inputs)

    assert built.parity.ok, built.parity.summary()
    config = json.loads((built.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert built.info["layer_map"] == [1, 3] and built.info["teacher_layers"] == 4
    assert built.info["steps"] == 4
    student: Any = built.variant.parity_reference(ctx)
    assert student is not ctx.reference and num_layers(ctx.reference) == 4
    reloaded = auto_class(ctx.spec.task).from_pretrained(built.path).eval()
    assert num_layers(reloaded) == 2
    with torch.no_grad():
        for batch in inputs:
            want, got = student(**batch)[0], reloaded(**batch)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_progressive_runs_its_stages(teachers: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(teachers["gpt2"], stages=[3, 2], steps=3)
    result = progressive_distill(ctx.reference, ctx.train_batches, ctx.cfg.distill, causal=True)

    assert result.stages == [3, 2]
    assert [row["stage"] for row in result.losses] == [0.0] * 3 + [1.0] * 3
    # Stage 1 keeps teacher layers [1, 2, 3]; stage 2 keeps stage-1 layers [1, 2] -> [2, 3].
    assert result.layer_map == [2, 3] and num_layers(result.student) == 2

    built = build_variant("distill-progressive", ctx, tmp_path / "prog", ctx.samples)
    assert built.parity.ok and built.info["stages"] == [3, 2] and built.info["steps"] == 6
    assert json.loads((built.path / "config.json").read_text())["n_layer"] == 2


def test_empty_train_data_is_a_config_error(teachers: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(teachers["bert"], n_train=0)
    for name in ("distill-layers", "distill-progressive"):
        with pytest.raises(ConfigError, match="needs training batches") as err:
            build_variant(name, ctx, tmp_path / name, ctx.samples)
        assert "train_batches" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="needs training batches"):
        distill(ctx.reference, [], DistillConfig(), causal=False)


def test_config_rejects_inconsistent_settings(teachers: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="strictly decreasing"):
        DistillConfig(stages=[3, 4])
    with pytest.raises(ValidationError, match="layer_map has 2 entries"):
        DistillConfig(layer_map=[1, 3], student_layers=3)
    with pytest.raises(ValidationError, match="increasing order"):
        DistillConfig(layer_map=[3, 1])
    assert DistillConfig(student_layers=3).stage_depths(6) == [4, 3]
    ctx = _ctx(teachers["bert"])
    with pytest.raises(ConfigError, match="does not fit"):
        distill(ctx.reference, ctx.train_batches, DistillConfig(layer_map=[1, 7]), causal=False)
    with pytest.raises(ConfigError, match="do not fit"):
        DistillConfig(stages=[5, 2]).stage_depths(4)  # 5 layers from a 4-layer teacher
