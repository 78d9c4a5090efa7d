"""Fast by default for causal LMs: an HF causal-LM directory is served by the fastest engine
(torch, ONNX Runtime fp32 or int8 KV-cache graph) that passes the generation gate against
torch fp32 here, built, gated and timed once at first start and cached by the model's hash."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from test_gen_engine import drain, greedy, reference, tiny_model, token_ids, tokenizer  # noqa: E402

from modelkiln.serve import autoengine, enginebuild  # noqa: E402
from modelkiln.serve.config import ModelSpec, ServeConfig  # noqa: E402
from modelkiln.serve.generation.backend import TorchCausalLMBackend  # noqa: E402
from modelkiln.serve.generation.ort_backend import OrtCausalLMBackend  # noqa: E402
from modelkiln.serve.loading import load_engine  # noqa: E402


def decisive(seed: int) -> Any:
    """A tiny random GPT-2 whose next-token distributions are peaked (ln_f scaled up), as a
    trained model's are: a random model's near-uniform ones would make any gate easy."""
    model = tiny_model("gpt2", seed=seed)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    path = tmp_path_factory.mktemp("autoengine-lm") / "lm"
    model = decisive(5)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return model, path


def spec(path: Path, **kw: Any) -> ModelSpec:
    return ModelSpec(path=path, name="lm", **kw)


def cfg(path: Path, **kw: Any) -> ServeConfig:
    return ServeConfig(models=[spec(path, **kw)], threads=1)


def decision(cache: Path) -> dict[str, Any]:
    (file,) = cache.glob("serve-engines/*/decision-*.json")
    data: dict[str, Any] = json.loads(file.read_text())
    return data


def test_first_start_builds_gates_times_and_logs_then_the_decision_is_reused(
    lm_dir: tuple[Any, Path],
    picking: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, path = lm_dir
    with caplog.at_level(logging.INFO, logger="modelkiln.serve"):
        first = autoengine.pick_causal_engine(spec(path), cfg(path))
    data = decision(picking)
    rows = data["candidates"]
    torch_name = next(n for n in rows if n.startswith("torch-"))
    assert set(rows) == {torch_name, "onnx-fp32", "onnx-int8"}
    assert rows["onnx-fp32"]["pass"] and rows["onnx-fp32"]["agree"] == 1.0
    assert rows["onnx-fp32"]["mean_kl"] < 1e-4  # the exported graph is the torch model
    assert all(r["tok_s"] > 0 for r in rows.values())
    passing = [n for n, r in rows.items() if r["pass"]]
    fastest = max(passing, key=lambda n: rows[n]["tok_s"])
    assert data["engine"] in (fastest, torch_name)  # torch keeps ties within MIN_GAIN
    assert data["batch"] == 32  # the server's max_num_seqs
    assert (first.backend == "onnx") == data["engine"].startswith("onnx")
    if first.onnx_file is not None:
        assert first.onnx_file.name == data["file"] and first.onnx_file.is_file()
    logged = caplog.text
    assert "first start of lm" in logged and "exporting the KV-cache ONNX graph" in logged
    assert f"engine of lm: {data['engine']} (decode tok/s at batch 32" in logged

    def no_build(*_: Any) -> None:
        raise AssertionError("the second start must not export again")

    monkeypatch.setattr(enginebuild, "export_causal_kv", no_build)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modelkiln.serve"):
        again = autoengine.pick_causal_engine(spec(path), cfg(path))
    assert again == first
    assert "decided at first start" in caplog.text


def test_a_graph_that_does_not_match_the_model_fails_the_gate_and_torch_stays(
    lm_dir: tuple[Any, Path], picking: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ONNX graphs come from another model (a broken export): both fail, torch is kept,
    even though they are timed as the fastest."""
    _, path = lm_dir
    real_export = enginebuild.export_causal_kv
    other = decisive(11)

    def wrong_export(model_dir: Path, target: Path, model: Any = None) -> None:
        real_export(model_dir, target, other)

    monkeypatch.setattr(enginebuild, "export_causal_kv", wrong_export)
    monkeypatch.setattr(
        autoengine,
        "_decode_speeds",
        lambda backends, prompts: {n: 5.0 if n.startswith("torch") else 50.0 for n in backends},
    )
    pick = autoengine.pick_causal_engine(spec(path), cfg(path))
    rows = decision(picking)["candidates"]
    assert pick.backend == "torch" and pick.onnx_file is None
    assert not rows["onnx-fp32"]["pass"] and not rows["onnx-int8"]["pass"]
    assert rows["onnx-fp32"]["agree"] < autoengine.MIN_AGREE
    assert "gate failed" in pick.reason
    engine = load_engine(spec(path), cfg(path), lambda stats: None)
    assert isinstance(engine.backend, TorchCausalLMBackend)


def test_the_chosen_onnx_engine_serves_real_completions(
    lm_dir: tuple[Any, Path], picking: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx-fp32 timed fastest: the server's engine runs the cached KV graph and its greedy
    completions are HF generate's, token for token, under concurrency."""
    model, path = lm_dir
    monkeypatch.setattr(
        autoengine,
        "_decode_speeds",
        lambda backends, prompts: {n: 50.0 if n == "onnx-fp32" else 5.0 for n in backends},
    )
    engine = load_engine(spec(path), cfg(path), lambda stats: None)
    assert isinstance(engine.backend, OrtCausalLMBackend)
    assert decision(picking)["engine"] == "onnx-fp32"
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [100]]
    budgets = [10, 6, 12]
    expected = [reference(model, p, n) for p, n in zip(prompts, budgets, strict=True)]

    async def main() -> list[list[int]]:
        await engine.start()
        streams = [engine.generate(greedy(f"r{i}", p, n))
                   for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))]  # fmt: skip
        results = await asyncio.gather(*(drain(s) for s in streams))
        await engine.shutdown(5)
        return [token_ids(r) for r in results]

    assert asyncio.run(main()) == expected


def test_switched_off_keeps_torch_builds_nothing_and_says_how_to_get_onnx(
    lm_dir: tuple[Any, Path],
    picking: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, path = lm_dir
    monkeypatch.setenv(autoengine.PICK_ENV, "0")
    with caplog.at_level(logging.INFO, logger="modelkiln.serve"):
        engine = load_engine(spec(path), cfg(path), lambda stats: None)
    assert isinstance(engine.backend, TorchCausalLMBackend)
    assert not list(picking.glob("serve-engines/*"))
    assert "add --backend onnx" in caplog.text


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"backend": "torch"}, "backend is pinned"),
        ({"precision": "fp32"}, "precision is pinned"),
        ({"adapter": "some-adapter"}, "adapter"),
    ],
)
def test_a_pinned_backend_precision_or_adapter_keeps_torch(
    lm_dir: tuple[Any, Path], picking: Path, kw: dict[str, Any], reason: str
) -> None:
    _, path = lm_dir
    pick = autoengine.pick_causal_engine(spec(path, **kw), cfg(path, **kw))
    assert pick.backend == "torch" and reason in pick.reason
    assert not list(picking.glob("serve-engines/*"))


def test_a_small_model_is_not_picked_for(lm_dir: tuple[Any, Path], monkeypatch: Any) -> None:
    _, path = lm_dir
    monkeypatch.delenv(autoengine.PICK_ENV, raising=False)
    pick = autoengine.pick_causal_engine(spec(path), cfg(path))
    assert pick.backend == "torch" and "small model" in pick.reason


def test_gate_figures_pass_near_ties_and_fail_real_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 4
    ref = torch.log_softmax(logits, -1)
    same = autoengine.gate_figures(ref, ref.clone())
    assert same["pass"] and same["agree"] == 1.0 and same["mean_kl"] == 0.0
    # a near-tie: the engine's greedy token is one torch scores within TIE_NATS of its best
    tied = logits.clone()
    top = tied.argmax(-1)
    tied[0, (top[0] + 1) % 50] = tied[0, top[0]] - autoengine.TIE_NATS / 2
    swapped = tied.clone()
    swapped[0, (top[0] + 1) % 50] = tied[0, top[0]] + autoengine.TIE_NATS / 2
    near = autoengine.gate_figures(torch.log_softmax(tied, -1), torch.log_softmax(swapped, -1))
    assert near["agree"] == 1.0 and near["pass"]
    # noise of about a quarter of a logit's spread: many greedy tokens flip, KL >> 0.01
    noisy = torch.log_softmax(logits + torch.randn(64, 50, generator=gen), -1)
    bad = autoengine.gate_figures(ref, noisy)
    assert not bad["pass"] and bad["mean_kl"] > autoengine.MAX_MEAN_KL
    broken = autoengine.gate_figures(ref, torch.full_like(ref, math.nan))
    assert not broken["pass"]


def test_workers_starting_together_build_once(
    lm_dir: tuple[Any, Path], picking: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers N: one process builds and times, the others wait for its decision."""
    import threading
    import time

    _, path = lm_dir
    calls: list[int] = []

    def slow_decide(spec: ModelSpec, cfg: ServeConfig, where: Path) -> dict[str, Any]:
        calls.append(1)
        time.sleep(0.3)
        row = {"mean_kl": 0.0, "agree": 1.0, "max_dlogp": 0.0, "pass": True, "tok_s": 1.0}
        return {
            "engine": "torch-fp32",
            "file": None,
            "batch": 32,
            "candidates": {"torch-fp32": row},
        }

    monkeypatch.setattr(autoengine, "_decide_causal", slow_decide)
    picks: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: picks.append(autoengine.pick_causal_engine(spec(path), cfg(path)))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(picks) == 3 and len(set(picks)) == 1


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, "PASSIVE"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        ({"GOMP_SPINCOUNT": "1000"}, None),
    ],
)
def test_the_server_quiets_openmp_unless_the_user_set_it(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], want: str | None
) -> None:
    from modelkiln.serve.__main__ import quiet_openmp

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    quiet_openmp()
    import os

    assert os.environ.get("OMP_WAIT_POLICY") == want


_TRIM_PROBE = """
from modelkiln.serve.autoengine import return_freed_memory
def rss():
    lines = open("/proc/self/status").read().splitlines()
    return [int(l.split()[1]) // 1024 for l in lines if l.startswith("VmRSS")][0]
big, keep = [], []
for _ in range(40_000):  # 312 MiB in 8 KiB blocks, each pinned in place by a small one after it
    big.append(bytes(8192)); keep.append(bytes(600))
del big
freed = rss()
return_freed_memory()
print(freed, rss())
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's (a no-op elsewhere)"
)
def test_return_freed_memory_gives_freed_heap_back() -> None:
    """What a first start does after timing its candidates: freed heap that glibc kept mapped
    (the 27.6 M GPT-2's first start served with 964 MiB RSS against 374 after a restart;
    673 with this) goes back to the OS. In a fresh process, so the figure is its own."""
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    freed, trimmed = map(int, out.split())
    assert trimmed < freed - 100, (freed, trimmed)  # MiB: freeing alone returned nothing
