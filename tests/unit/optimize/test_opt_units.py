"""Pieces of the optimize stage alone: auto's choice on hand-made cards, the interleaved benchmark
with toy runners, the per-layer error report, the comparison table, metrics, the public API."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import opt_helpers as h  # noqa: E402

import modelkiln.optimize as opt  # noqa: E402
from modelkiln.optimize.auto import choose  # noqa: E402
from modelkiln.optimize.bench import benchmark, percentile  # noqa: E402
from modelkiln.optimize.config import BenchConfig, Tolerance  # noqa: E402
from modelkiln.optimize.gate import EvalCard, QualityMetric, judge  # noqa: E402
from modelkiln.optimize.layer_error import (  # noqa: E402  # noqa: E402
    fake_quant_activation,
    fake_quant_weight,
    layer_error_report,
    render_layer_error,
)
from modelkiln.optimize.report import compare_models  # noqa: E402


def _card(name: str, status: Any, items_per_s: float | None, ratio: float = 1.0) -> EvalCard:
    timing = {
        "batch": 32,
        "seq": 128,
        "p50_ms": None,
        "p95_ms": None,
        "items_per_s": items_per_s,
        "aborted": "" if items_per_s else "stopped: 9.0x slower than the baseline",
    }
    if items_per_s:
        timing |= {"p50_ms": 32000 / items_per_s, "p95_ms": 33000 / items_per_s}
    family = "baseline" if name == "base" else "quantization"
    quality = {"metric": "mrr@10", "value": 0.5 * ratio, "baseline": 0.5, "ratio": ratio}
    return EvalCard(name, family, "torch", name, status, quality=quality, latency=[timing],
                    size_bytes=1_000_000)  # fmt: skip


BENCH = BenchConfig(batch_sizes=[32], seq_lengths=[128])


def test_auto_picks_the_fastest_passing_variant_and_never_a_slower_one() -> None:
    cards = {
        "base": _card("base", "baseline", 100.0),
        "fast": _card("fast", "passed", 200.0),
        "faster-but-rejected": _card("faster-but-rejected", "rejected", 400.0, ratio=0.9),
        "slower": _card("slower", "passed", 80.0),
        "stopped": _card("stopped", "skipped", None),
    }
    decision = choose(cards, "base", BENCH, min_speedup=1.05)
    assert decision.chosen == "fast" and decision.speedup == 2.0
    assert decision.considered["slower"].startswith("not chosen: slower than the baseline")
    assert decision.considered["faster-but-rejected"].startswith("not eligible: rejected")
    assert decision.considered["stopped"].startswith("not eligible")
    only_slow = {k: cards[k] for k in ("base", "slower")}
    assert choose(only_slow, "base", BENCH).chosen == "base"
    noise = {"base": cards["base"], "same": _card("same", "passed", 103.0)}
    assert choose(noise, "base", BENCH, min_speedup=1.05).chosen == "base"


def test_gate_judges_quality_ratio_and_parity() -> None:
    card = _card("q", "passed", 100.0, ratio=0.985)
    assert "< threshold 0.99" in judge(card, 0.99, require_parity=True)[0]
    assert judge(card, 0.98, require_parity=True) == []
    card.parity = {"ok": False, "summary": "1 of 3 checks outside SNR >= 10 dB"}
    assert "parity" in judge(card, 0.98, require_parity=True)[0]
    assert judge(card, 0.98, require_parity=False) == []
    assert judge(_card("base", "baseline", 1.0, ratio=0.1), 0.99, require_parity=True) == []


def test_quality_ratio_for_lower_is_better_metrics() -> None:
    ppl = QualityMetric("perplexity", lambda r: 0.0, higher_is_better=False)
    assert ppl.ratio(11.0, 10.0) == pytest.approx(10 / 11)
    mrr = QualityMetric("mrr@10", lambda r: 0.0)
    assert mrr.ratio(0.495, 0.5) == pytest.approx(0.99)


def test_benchmark_interleaves_and_stops_a_slow_runner() -> None:
    calls: list[str] = []

    def runner(name: str, sleep: float) -> Any:
        def run(batch: dict[str, Any]) -> None:
            calls.append(name)
            time.sleep(sleep)

        return run

    cfg = BenchConfig(batch_sizes=[1, 8], seq_lengths=[4], warmup=1, min_runs=3, max_runs=3,
                      max_seconds=10, slow_abort=3)  # fmt: skip
    runners = {"base": runner("base", 0.001), "slow": runner("slow", 0.03)}
    timings = benchmark(runners, lambda b, s: {"b": b}, cfg, baseline="base")
    assert calls[:4] == ["base", "slow", "base", "slow"]  # warmup, then round-robin
    small, large = timings["slow"]
    assert small.aborted.startswith("stopped") and small.runs == 2
    assert large.aborted.startswith("skipped") and large.runs == 0
    base_small, base_large = timings["base"]
    assert base_small.runs == base_large.runs == 3 and base_large.batch == 8
    assert base_large.items_per_s == pytest.approx(8000 / base_large.mean_ms)


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert percentile([5.0], 95) == 5.0


def test_fake_quant_is_int8_on_a_grid() -> None:
    w = torch.randn(8, 16)
    q = fake_quant_weight(w, "per-channel")
    steps = q / (w.abs().amax(dim=1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert (q - w).abs().max() <= w.abs().max() / 127
    q7 = fake_quant_weight(w, "per-channel", bits=7)  # ORT reduce_range
    steps7 = q7 / (w.abs().amax(dim=1, keepdim=True) / 63)
    assert torch.allclose(steps7, steps7.round(), atol=1e-4) and steps7.abs().max() <= 63 + 1e-4
    x = torch.randn(4, 16) * 3
    for mode in ("per-token-symmetric", "per-tensor-asymmetric", "per-tensor-symmetric"):
        assert (fake_quant_activation(x, mode) - x).abs().max() < x.abs().max() / 50


def test_layer_error_report_covers_every_linear_and_conv1d(tmp_path: Path) -> None:
    from modelkiln.optimize.runners import load_torch_model, synthetic_batch

    for make, kind, n_layers in ((h.make_bert, "Linear", 13), (h.make_gpt2, "Conv1D", 9)):
        spec = h.spec_of(make(tmp_path / kind))
        model = load_torch_model(spec)
        batches = [synthetic_batch(spec, 2, 10, seed=0)]
        rows = layer_error_report(model, batches, scheme="torchao-int8-dynamic")
        assert len(rows) == n_layers  # GPT-2: 4 Conv1D per block + the tied lm_head
        assert kind in {r.kind for r in rows}
        assert [r.snr_db for r in rows] == sorted(r.snr_db for r in rows)
        assert all(20 < r.snr_db < 200 and r.mse > 0 and r.max_abs > 0 for r in rows)
        coarse = layer_error_report(model, batches, scheme="int8-per-tensor")
        fine = {r.name: r.snr_db for r in rows}
        assert sum(r.snr_db for r in coarse) < sum(fine.values())  # per-tensor loses more
        assert "| layer | kind |" in render_layer_error(rows, "torchao-int8-dynamic", top=3)


def test_comparison_table_has_one_row_per_variant() -> None:
    cards = {"base": _card("base", "baseline", 100.0), "fast": _card("fast", "chosen", 200.0)}
    cards["fast"].speedup = 2.0
    table = compare_models(cards, BENCH, "base")
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in lines] == ["`base`", "`fast`"]
    assert "p50 / p95 ms b32x128" in table and "2.00x" in table and "mrr@10 0.5000" in table


def test_tolerance_needs_a_check() -> None:
    with pytest.raises(ValueError, match="atol"):
        Tolerance()
    assert Tolerance(min_snr_db=10).describe() == "SNR >= 10 dB"


def test_public_api_is_pinned_and_import_is_light() -> None:
    assert opt.__all__ == [
        "OptimizeConfig", "Tolerance", "load_optimize_config", "VARIANTS", "Variant", "optimize",
        "OptimizeResult", "ModelOptimizer", "load_variant", "QualityMetric", "EvalCard",
        "code_search_metric", "perplexity_metric", "export_onnx", "validate_onnx", "ParityReport",
        "layer_error_report", "benchmark", "compare_models", "optimize_source", "prepare_source",
        "export_kv_onnx", "OrtKvGenerator", "prune_model", "distill", "progressive_distill",
        "optimize_cnn",
    ]  # fmt: skip
    for name in opt.__all__:
        assert getattr(opt, name) is not None
    assert opt.VARIANTS.names() == [
        "torch-fp32", "torch-bf16", "torch-int8-dynamic", "onnx-fp32", "onnx-int8-dynamic",
        "torch-export", "torchscript", "onnx-int4-weight", "onnx-int8-static", "qat-int8",
        "onnx-tensorrt", "distill-layers", "distill-progressive", "prune-unstructured",
        "prune-structured", "prune-evo",
    ]  # fmt: skip
    code = (
        "import sys, modelkiln.optimize as o; o.OptimizeConfig(methods=['onnx-fp32']); "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # The listing order does not depend on which variant module was imported first.
    first = "import modelkiln.optimize.prune.variants, modelkiln.optimize.quant_static; "
    code = first + "from modelkiln.optimize import VARIANTS; print(','.join(VARIANTS.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == opt.VARIANTS.names()


def test_metrics_run_on_runners_like_on_hf_models(tmp_path: Path) -> None:
    from modelkiln.optimize.gate import code_search_metric, perplexity_metric
    from modelkiln.optimize.runners import TorchRunner, load_torch_model
    from modelkiln.train.encoder import evaluate_code_search

    tok = h.word_tokenizer()
    docs = ["add the number", "sort a list", "open the file", "read a path"]
    codes = ["return sum value", "return sort list", "open file path", "read path value"]
    spec = h.spec_of(h.make_bert(tmp_path / "bert"))
    model = load_torch_model(spec)
    metric = code_search_metric(docs, codes, tok, max_length=16)
    assert metric.name == "mrr@10" and metric.higher_is_better and metric.samples
    direct = evaluate_code_search(model, tok, docs, codes, max_length=16, batch_size=32)
    assert metric(TorchRunner(model, spec)) == pytest.approx(direct["mrr@10"])

    spec = h.spec_of(h.make_gpt2(tmp_path / "gpt2"))
    lm = load_torch_model(spec)
    texts = ["add the number to the list", "open the file path and read the value"]
    ppl = perplexity_metric(texts, tok, batch_size=1)
    assert not ppl.higher_is_better
    with torch.no_grad():  # the same token-weighted loss, from transformers' own labels path
        losses = [lm(**tok(t, return_tensors="pt"), labels=tok(t, return_tensors="pt")["input_ids"])
                  for t in texts]  # fmt: skip
    n = [len(tok(t)["input_ids"]) - 1 for t in texts]
    expected = float(torch.exp(sum(o.loss * k for o, k in zip(losses, n, strict=True)) / sum(n)))
    assert ppl(TorchRunner(lm, spec)) == pytest.approx(expected, rel=1e-4)
    batched = perplexity_metric(texts, tok, batch_size=2)  # right padding is masked out
    assert batched(TorchRunner(lm, spec)) == pytest.approx(expected, rel=1e-4)
