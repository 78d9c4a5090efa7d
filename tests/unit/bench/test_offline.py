"""``kiln bench offline``: interleaved sweep on tiny models (torch and ONNX Runtime),
the stopping rule, the optimal-batch rule, and the JSON / PNG / HTML outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_helpers import tiny_encoder_dir
from typer.testing import CliRunner

from modelkiln.bench.offline import OfflineConfig, optimal_batch, run_offline
from modelkiln.bench.offline.runners import Runner
from modelkiln.bench.offline.timing import Cell, time_cells
from modelkiln.cli import app
from modelkiln.errors import ArtifactError, ConfigError


def tiny_onnx_dir(path: Path) -> Path:
    """A hand-built ONNX graph (embedding lookup, masked) + config.json: an 'encoder'."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.random.default_rng(0).random((50, 16), np.float32), "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"]),
    ]
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
           for n in ("input_ids", "attention_mask")]  # fmt: skip
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", 16])
    graph = helper.make_graph(nodes, "tiny", ins, [out], [emb, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    (path / "config.json").write_text(json.dumps({"vocab_size": 50}))
    (path / "variant.json").write_text(json.dumps({"variant": "onnx-fp32", "backend": "onnx"}))
    return path


def test_torch_sweep_writes_json_png_html_and_picks_a_batch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "offline", str(tiny_encoder_dir()), "--batches", "1,2,4", "--seqs", "8,16",
        "--warmup", "1", "--min-runs", "3", "--max-runs", "6", "--budget", "10", "--threads", "1",
        "-o", str(out),
        "--history", str(tmp_path / "h.jsonl"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "offline.json").read_text())
    assert len(data["rows"]) == 6 and {r["backend"] for r in data["rows"]} == {"torch"}
    for row in data["rows"]:
        assert 3 <= row["runs"] <= 6 and row["stop"] in ("stable", "max runs", "time budget")
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] and row["rss_mb"] > 0
        assert row["items_per_s_per_mb"] == pytest.approx(row["items_per_s"] / row["rss_mb"])
    assert {o["seq"] for o in data["optimal"]} == {8, 16}
    assert (out / "benchmark_report.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert "Optimal batch" in page and "data:image/png;base64," in page
    assert json.loads((tmp_path / "h.jsonl").read_text())["bench"] == "offline"


def test_onnx_runtime_backend_on_a_variant_dir(tmp_path: Path) -> None:
    cfg = OfflineConfig(model=str(tiny_onnx_dir(tmp_path / "v")), batches=[1, 4], seqs=[4],
                        warmup=1, min_runs=2, max_runs=4, budget_s=5)  # fmt: skip
    result = run_offline(cfg)
    assert [r["backend"] for r in result["rows"]] == ["onnx", "onnx"]
    assert all(r["runs"] >= 2 for r in result["rows"])
    with pytest.raises(ConfigError, match="no weights for backend 'torch'"):
        run_offline(cfg.model_copy(update={"backends": ["torch"]}))
    with pytest.raises(ArtifactError, match="holds neither"):
        run_offline(OfflineConfig(model=str(tmp_path)))
    (tmp_path / "v" / "model.onnx").unlink()  # a variant dir that lost its weights
    with pytest.raises(ArtifactError, match="variant 'onnx-fp32' in .* holds neither"):
        run_offline(cfg)


def test_optimal_batch_stops_at_the_first_small_gain_or_the_memory_cap() -> None:
    rows = [{"batch": b, "items_per_s": t, "rss_mb": m}
            for b, t, m in ((1, 100, 10), (2, 180, 11), (4, 185, 12), (8, 400, 13))]  # fmt: skip
    assert optimal_batch(rows)["batch"] == 2  # 4 gains < 5 %: the walk stops there
    assert optimal_batch(rows, memory_cap_mb=10.5)["batch"] == 1
    assert optimal_batch(rows, min_gain=0.0)["batch"] == 8
    assert optimal_batch([]) is None


def test_cells_stop_on_stability_runs_or_time() -> None:
    calls: list[int] = []
    runner = Runner("fake", lambda b, s: None, lambda _: calls.append(1), 10, None)
    cells = [Cell(runner, 1, 1), Cell(runner, 2, 1)]
    time_cells(cells, min_runs=2, max_runs=5, cv_target=1e-12, budget_s=30)
    assert [c.stop for c in cells] == ["max runs", "max runs"] and len(calls) == 10
    slow = [Cell(runner, 1, 1)]
    time_cells(slow, min_runs=2, max_runs=10**9, cv_target=1e-12, budget_s=0.05)
    assert slow[0].stop == "time budget"
    stable = [Cell(runner, 1, 1)]
    time_cells(stable, min_runs=3, max_runs=10**9, cv_target=10.0, budget_s=30)
    assert stable[0].stop == "stable" and len(stable[0].times_ms) == 3


def test_compile_adds_an_interleaved_compiled_twin(tmp_path: Path) -> None:
    # backend "eager": dynamo traces and guards for real, without inductor's minutes of codegen
    cfg = OfflineConfig(model=str(tiny_encoder_dir()), batches=[1, 2], seqs=[8], warmup=1,
                        min_runs=2, max_runs=3, budget_s=5, threads=1, compile=True,
                        compile_backend="eager")  # fmt: skip
    result = run_offline(cfg)
    assert [r["backend"] for r in result["rows"]] == ["torch"] * 2 + ["torch-compile"] * 2
    assert all(r["first_call_ms"] > 0 and r["runs"] >= 2 for r in result["rows"])
    (check,) = result["compile_checks"]
    assert check["backend"] == "torch-compile" and check["max_abs_diff"] < 1e-5
    assert "torch.compile" in result["variants"][1]["compile"]
    with pytest.raises(ConfigError, match="--compile needs a torch module; format 'onnx'"):
        from modelkiln.bench.offline.runners import compiled_runner, load_runners

        compiled_runner(load_runners(tiny_onnx_dir(tmp_path / "v"), None, 1)[0])
