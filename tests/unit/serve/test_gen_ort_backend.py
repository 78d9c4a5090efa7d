"""ONNX Runtime generation backend: same tokens as ``generate`` under joins and leaves, the
engine on it end to end, loading from a Hugging Face directory (graph exported at load) and from
an optimize variant directory, and the refusals (adapters, no graph to run)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from test_gen_engine import (  # noqa: E402
    EOS,
    drain,
    greedy,
    prompts,
    reference,
    tiny_model,
    token_ids,
    tokenizer,
)

from modelkiln.errors import ServingError  # noqa: E402
from modelkiln.kvgraph import KV_ONNX  # noqa: E402
from modelkiln.serve.generation import ContinuousBatchingEngine  # noqa: E402
from modelkiln.serve.generation.ort_backend import OrtCausalLMBackend  # noqa: E402


def save(model: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    root = tmp_path_factory.mktemp("ort-lms")
    out = {}
    for arch, seed in (("gpt2", 3), ("llama", 4)):
        model = tiny_model(arch, seed=seed)
        out[arch] = (model, save(model, root / arch))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scripted_joins_and_leaves_give_the_tokens_of_generate(
    arch: str, saved: dict[str, tuple[Any, Path]]
) -> None:
    """Rows join and leave at fixed steps (left padding, cache cuts, group stacking)."""
    model, path = saved[arch]
    ps, budgets, join_at = prompts(6, seed=1), [5, 14, 3, 9, 12, 6], [0, 0, 2, 3, 3, 8]
    expected = [reference(model, p, n) for p, n in zip(ps, budgets, strict=True)]
    backend = OrtCausalLMBackend.from_path(path, threads=1)
    got: dict[int, list[int]] = {i: [] for i in range(6)}
    last: dict[int, int] = {}
    for step in range(40):
        done = [i for i in last if len(got[i]) >= budgets[i] or got[i][-1] == EOS]
        backend.release([str(i) for i in done])
        for i in done:
            del last[i]
        if last:
            logits = backend.decode([str(i) for i in reversed(last)], list(reversed(last.values())))
            for row, i in enumerate(reversed(list(last))):  # logits follow the order asked for
                last[i] = int(logits[row].argmax())
                got[i].append(last[i])
        new = [i for i in range(6) if join_at[i] == step]
        if new:
            logits = backend.prefill([(str(i), ps[i]) for i in new])
            assert logits.dtype == torch.float32 and logits.shape == (len(new), backend.vocab_size)
            for row, i in enumerate(new):
                got[i].append(last.setdefault(i, int(logits[row].argmax())))
    assert [got[i] for i in range(6)] == expected
    assert backend.rows == []


def test_engine_on_the_onnx_backend_streams_generate_tokens_concurrently(
    saved: dict[str, tuple[Any, Path]],
) -> None:
    model, path = saved["llama"]
    ps, budgets = prompts(5, seed=2), [9, 4, 12, 6, 10]
    expected = [reference(model, p, n) for p, n in zip(ps, budgets, strict=True)]
    engine = ContinuousBatchingEngine.from_path(path, backend="onnx", max_num_seqs=3, threads=1)
    assert isinstance(engine.backend, OrtCausalLMBackend)

    async def main() -> list[list[int]]:
        await engine.start()
        streams = [engine.generate(greedy(f"r{i}", p, n)) for i, (p, n) in
                   enumerate(zip(ps, budgets, strict=True))]  # fmt: skip
        results = await asyncio.gather(*(drain(s) for s in streams))
        await engine.shutdown(5)
        return [token_ids(r) for r in results]

    assert asyncio.run(main()) == expected
    assert engine.stats()["tokens_out"] == sum(len(e) for e in expected)


def test_a_variant_directory_with_a_kv_graph_is_served_without_torch_weights(
    saved: dict[str, tuple[Any, Path]], tmp_path: Path
) -> None:
    from modelkiln.contract.hfmodel import inspect_model
    from modelkiln.kvgraph import export_kv_onnx
    from modelkiln.serve.config import ModelSpec
    from modelkiln.serve.loading import resolve_backend

    model, path = saved["gpt2"]
    variant = tmp_path / "variant"
    variant.mkdir()
    model.config.save_pretrained(variant)
    tokenizer().save_pretrained(variant)
    export_kv_onnx(model, inspect_model(path, "causal-lm"), variant / KV_ONNX)

    assert resolve_backend(ModelSpec(path=variant)) == "onnx"
    backend = OrtCausalLMBackend.from_path(variant)
    logits = backend.prefill([("a", prompts(1)[0])])
    assert int(logits[0].argmax()) == reference(model, prompts(1)[0], 1)[0]


def test_refusals_name_the_problem(saved: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    _, path = saved["gpt2"]
    backend = OrtCausalLMBackend.from_path(path)
    with pytest.raises(ServingError, match="onnx generation backend serves a fixed graph"):
        backend.load_adapter("a", tmp_path)
    with pytest.raises(ServingError, match="not loaded on the onnx backend"):
        backend.prefill([("x", [5, 6])], {"x": "a"})
    with pytest.raises(ServingError, match="need backend: torch"):
        ContinuousBatchingEngine.from_path(path, backend="onnx", precision="bf16")
    empty = tmp_path / "config-only"
    empty.mkdir()
    saved["gpt2"][0].config.save_pretrained(empty)
    with pytest.raises(ServingError, match="no model_kv.onnx and no torch weights"):
        OrtCausalLMBackend.from_path(empty)
