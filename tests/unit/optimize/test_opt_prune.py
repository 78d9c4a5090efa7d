"""Pruning: structured shapes and reload (BERT / GPT-2 / Llama), exact sparsity, Taylor vs
magnitude importance, the evolutionary ratio search, config errors, the variants' reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import opt_helpers as h  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.optimize.api import build_variant  # noqa: E402
from modelkiln.optimize.config import load_optimize_config  # noqa: E402
from modelkiln.optimize.prune.config import PruneConfig, check_sparsity  # noqa: E402
from modelkiln.optimize.prune.gradual import prune_model  # noqa: E402
from modelkiln.optimize.prune.search import counts_for, evolutionary_search  # noqa: E402
from modelkiln.optimize.prune.structured import (  # noqa: E402
    ffn_groups,
    head_groups,
    taylor_for,
    unit_scores,
)
from modelkiln.optimize.prune.unstructured import nested_counts, prunable_layers  # noqa: E402
from modelkiln.optimize.registry import BuildContext  # noqa: E402
from modelkiln.optimize.runners import auto_class, load_torch_model, synthetic_batch  # noqa: E402


def make_llama(path: Path) -> Path:
    """A 2-layer, 32-wide random Llama LM with grouped-query attention (4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=h.VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


MAKERS = {"bert": h.make_bert, "gpt2": h.make_gpt2, "llama": make_llama}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune-models")
    return {name: make(root / name) for name, make in MAKERS.items()}


def _load(path: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    spec = h.spec_of(path)
    model: Any = load_torch_model(spec)
    batches = [synthetic_batch(spec, 4, 16, seed=20 + i, pad_last=i == 0) for i in range(4)]
    return spec, model, batches


def _copy(model: Any) -> Any:
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def _main(model: Any, batch: dict[str, Any]) -> Any:
    with torch.inference_mode():
        return model(**batch)[0]


@pytest.mark.parametrize("name", list(MAKERS))
def test_structured_pruning_shapes_reload_and_size(
    name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    spec, reference, batches = _load(models[name])
    structure = "ffn+heads" if name == "llama" else "ffn"
    cfg = PruneConfig(target_sparsity=0.5, structure=structure, criterion="taylor",
                      schedule_steps=2, recovery_steps=2)  # fmt: skip
    causal = spec.task == "causal-lm"
    before = sum(p.numel() for p in reference.parameters())

    result = prune_model(_copy(reference), reference, cfg, batches, causal, method="structured")

    pruned: Any = result.model
    ffn_width = 64 if name != "gpt2" else 128  # GPT-2: n_inner = 4 * n_embd
    assert result.report["widths"]["ffn"] == ffn_width // 2
    for group in ffn_groups(pruned):
        for part in group.parts:
            assert part.module.weight.shape[part.axis] == ffn_width // 2
    if name == "llama":
        assert pruned.config.num_key_value_heads == 1 and pruned.config.num_attention_heads == 2
        for group in head_groups(pruned):
            assert group.attention.q_proj.weight.shape == (2 * 8, 32)
            assert group.attention.k_proj.weight.shape == (8, 32)
            assert group.attention.o_proj.weight.shape == (32, 2 * 8)
    assert [s["sparsity"] for s in result.history] == cfg.cubic_schedule()
    assert sum(p.numel() for p in pruned.parameters()) < before
    # Saved as a plain HF directory: from_pretrained rebuilds the new shapes, same outputs.
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = auto_class(spec.task).from_pretrained(tmp_path / "pruned").eval()
    for batch in batches[:2]:
        torch.testing.assert_close(_main(reloaded, batch), _main(pruned, batch))
    assert not torch.allclose(_main(reloaded, batches[1]), _main(reference, batches[1]))


def test_heads_cannot_be_removed_loadably_from_bert(models: dict[str, Path]) -> None:
    _, reference, batches = _load(models["bert"])
    cfg = PruneConfig(structure="heads", recovery_steps=0)
    with pytest.raises(ConfigError, match="heads"):
        prune_model(_copy(reference), reference, cfg, batches, False, method="structured")


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_unstructured_gradual_reaches_exact_sparsity(
    name: str, criterion: str, models: dict[str, Path]
) -> None:
    spec, reference, batches = _load(models[name])
    cfg = PruneConfig(target_sparsity=0.37, criterion=criterion, schedule_steps=3,
                      recovery_steps=2)  # fmt: skip
    model = _copy(reference)

    result = prune_model(model, reference, cfg, batches, spec.task == "causal-lm",
                         method="unstructured")  # fmt: skip

    layers: list[Any] = prunable_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    assert zeros == round(0.37 * total) == result.report["zeros"]
    assert result.report["global_sparsity"] == pytest.approx(0.37, abs=1 / total)
    assert all(not hasattr(m, "weight_mask") for _, m in layers)  # made permanent
    assert len(result.report["layers"]) == len(layers)
    assert [s["masked"] for s in result.history][-1] == zeros
    steps = [s["masked"] for s in result.history]
    assert steps == sorted(steps) and steps[0] < steps[-1]


def test_taylor_importance_differs_from_magnitude(models: dict[str, Path]) -> None:
    spec, model, batches = _load(models["gpt2"])
    groups = ffn_groups(model)
    l2 = unit_scores(groups, "l2")
    taylor = unit_scores(groups, "taylor", taylor_for(model, groups, batches, causal=True))
    for a, b in zip(l2, taylor, strict=True):
        assert torch.all(b >= 0) and b.sum() > 0
        assert not torch.equal(a.argsort(), b.argsort())
    # Taylor scores come from gradients: other batches give other scores; magnitude does not move.
    other = [synthetic_batch(spec, 4, 16, seed=99)]
    taylor2 = unit_scores(groups, "taylor", taylor_for(model, groups, other, causal=True))
    assert not torch.allclose(taylor[0], taylor2[0])
    assert torch.equal(unit_scores(groups, "l2")[0], l2[0])


def test_evolutionary_search_is_deterministic_and_improves(models: dict[str, Path]) -> None:
    _, reference, batches = _load(models["bert"])
    cfg = PruneConfig(target_sparsity=0.6, search_population=6, search_generations=4,
                      search_budget_s=120, seed=3)  # fmt: skip

    first = evolutionary_search(reference, batches[-1:], cfg)
    again = evolutionary_search(reference, batches[-1:], cfg)

    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history]
               for r in (first, again)]  # fmt: skip
    assert first.ratios == again.ratios and untimed[0] == untimed[1]
    assert first.stopped == "generations" and len(first.history) == 5
    bests = [row["best"] for row in first.history]
    assert bests == sorted(bests)  # elitism: never worse
    assert first.fitness > first.uniform_fitness
    assert len(set(round(r, 6) for r in first.ratios)) > 1  # non-uniform per-layer ratios
    sizes = [m.weight.numel() for _, m in prunable_layers(reference)]
    assert sum(counts_for(first.ratios, sizes, 0.6)) == round(0.6 * sum(sizes))


def test_per_layer_counts_are_exact_and_nested() -> None:
    sizes = [100, 37, 250]
    counts = counts_for([0.9, 0.1, 0.45], sizes, 0.5)
    assert sum(counts) == round(0.5 * sum(sizes))
    assert all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))
    grown = nested_counts([5, 3, 10], [4, 4, 2])  # a layer may never lose zeros between steps
    assert grown == [5, 4, 9] and sum(grown) == 18


def test_search_stops_at_time_budget(models: dict[str, Path]) -> None:
    _, reference, batches = _load(models["bert"])
    cfg = PruneConfig(search_population=4, search_generations=50, search_budget_s=0.01)
    result = evolutionary_search(reference, batches[-1:], cfg)
    assert result.stopped == "budget" and len(result.history) < 51


@pytest.mark.parametrize("bad", [0, 1.0, -0.2, 1.5])
def test_bad_sparsity_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match=f"target_sparsity.*{bad}"):
        load_optimize_config({"prune": {"target_sparsity": bad}})
    with pytest.raises(ConfigError, match=str(bad)):
        check_sparsity(bad)


def test_cubic_schedule_ends_exactly_on_target() -> None:
    schedule = PruneConfig(target_sparsity=0.8, schedule_steps=4).cubic_schedule()
    assert schedule[-1] == 0.8 and schedule == sorted(schedule) and len(schedule) == 4
    assert schedule[0] > 0.8 / 4  # cubic: big steps first


def _ctx(path: Path, prune: dict[str, Any], train: bool = True) -> BuildContext:
    spec, reference, batches = _load(path)
    samples = [synthetic_batch(spec, 2, 12, seed=5, pad_last=True)]
    cfg = h.fast_config(prune=prune)
    return BuildContext(spec, reference, cfg, samples, batches if train else [])


def test_variants_write_reports_and_reload(models: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(models["bert"], {"target_sparsity": 0.5, "recovery_steps": 2})
    inputs = [*ctx.samples, synthetic_batch(ctx.spec, 3, 20, seed=7)]
    built = build_variant("prune-unstructured", ctx, tmp_path / "u", inputs)
    assert built.parity.ok, built.parity.summary()
    info = json.loads((built.path / "variant.json").read_text())
    report = json.loads((built.path / "sparsity.json").read_text())
    assert info["prune"]["global_sparsity"] == report["global_sparsity"] == pytest.approx(0.5)
    assert "| layer | params | zeros | sparsity |" in (built.path / "sparsity.md").read_text()

    evo_ctx = _ctx(models["bert"], {"target_sparsity": 0.5, "recovery_steps": 1,
                                    "search_population": 4, "search_generations": 2})  # fmt: skip
    evo = build_variant("prune-evo", evo_ctx, tmp_path / "e", inputs)
    assert evo.parity.ok, evo.parity.summary()
    search = evo.info["search"]
    assert len(search["ratios"]) == len(report["layers"]) and len(search["history"]) == 3
    assert evo.info["prune"]["global_sparsity"] == pytest.approx(0.5)

    llama = _ctx(models["llama"], {"structure": "ffn+heads", "recovery_steps": 1})
    inputs = [*llama.samples, synthetic_batch(llama.spec, 1, 9, seed=8)]
    built = build_variant("prune-structured", llama, tmp_path / "s", inputs)
    assert built.parity.ok, built.parity.summary()
    config = json.loads((built.path / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["num_key_value_heads"] == 1
    assert config["num_attention_heads"] == 2 and config["head_dim"] == 8


def test_training_variants_need_batches(models: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(models["gpt2"], {}, train=False)
    with pytest.raises(ConfigError, match="training batches"):
        build_variant("prune-structured", ctx, tmp_path / "s", ctx.samples)
    # Magnitude pruning without recovery needs no training data.
    ctx = _ctx(models["gpt2"], {"recovery_steps": 0, "criterion": "l1"}, train=False)
    built = build_variant("prune-structured", ctx, tmp_path / "s2", ctx.samples)
    assert built.parity.ok and built.info["prune"]["widths"] == {"ffn": 64}
