"""The quality gate, target 'auto' and name errors, through optimize() on a tiny BERT."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import opt_helpers as h  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from modelkiln.errors import ConfigError, QualityGateError  # noqa: E402
from modelkiln.optimize import ModelOptimizer, OptimizeConfig, optimize  # noqa: E402
from modelkiln.optimize.config import load_optimize_config  # noqa: E402
from modelkiln.optimize.gate import EvalCard  # noqa: E402
from modelkiln.optimize.quantize import OnnxFp32Variant  # noqa: E402
from modelkiln.optimize.registry import VARIANTS  # noqa: E402
from modelkiln.optimize.runners import OrtRunner  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return h.make_bert(tmp_path_factory.mktemp("gate") / "bert")


class _SleepyRunner(OrtRunner):
    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        time.sleep(0.1)  # far slower than a 2-layer, 32-wide encoder's forward
        return super().run(feed)


class _NoisyRunner(OrtRunner):
    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        out = super().run(feed)
        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def test_variants() -> Iterator[None]:
    """Two throwaway variants: a deliberately slow one and a deliberately broken one."""

    class SlowVariant(OnnxFp32Variant):
        summary = "onnx-fp32 with a sleep in its runner"

        def load(self, path: Path, threads: int | None = None) -> OrtRunner:
            from modelkiln.optimize.quantize import _spec

            return _SleepyRunner(path / "model.onnx", _spec(path), threads)

    class BrokenVariant(OnnxFp32Variant):
        family = "quantization"
        summary = "onnx-fp32 plus unit noise on every output"

        def load(self, path: Path, threads: int | None = None) -> OrtRunner:
            from modelkiln.optimize.quantize import _spec

            return _NoisyRunner(path / "model.onnx", _spec(path), threads)

    VARIANTS.register("test-slow")(SlowVariant)
    VARIANTS.register("test-broken")(BrokenVariant)
    yield
    VARIANTS.unregister("test-slow")
    VARIANTS.unregister("test-broken")


def test_gate_failure_raises_and_keeps_a_rejected_card(bert: Path, tmp_path: Path) -> None:
    cfg = h.fast_config(target="onnx-int8-dynamic", gate={"quantization": 1.5})
    with pytest.raises(QualityGateError, match="onnx-int8-dynamic failed the quality gate"):
        optimize(bert, cfg, h.agreement_metric(h.spec_of(bert)), tmp_path)
    card = json.loads((tmp_path / "variants" / "onnx-int8-dynamic" / "eval_card.json").read_text())
    assert card["status"] == "rejected"
    assert "threshold 1.5" in card["reasons"][0]
    assert card["quality"]["ratio"] <= 1.0 and card["size_bytes"] > 0 and card["latency"]
    assert card["machine"]["cpu"] and card["parity"]["ok"]
    assert (tmp_path / "variants" / "onnx-int8-dynamic" / "model.onnx").is_file()  # kept
    assert not (tmp_path / "model").exists()  # never promoted
    assert (tmp_path / "report.md").is_file()


def test_named_target_that_passes_is_promoted(bert: Path, tmp_path: Path) -> None:
    result = ModelOptimizer(bert, h.agreement_metric(h.spec_of(bert)), h.fast_config()).export_onnx(
        tmp_path
    )
    assert result.chosen == "onnx-fp32" and result.cards["onnx-fp32"].status == "chosen"
    assert (tmp_path / "model" / "model.onnx").is_file()
    assert EvalCard.read(tmp_path / "model").status == "chosen"
    assert "| `onnx-fp32` | chosen |" in result.table
    assert result.plot_path is not None and result.plot_path.is_file()


@pytest.mark.usefixtures("test_variants")
def test_auto_never_chooses_a_slower_or_broken_variant(bert: Path, tmp_path: Path) -> None:
    # slow_abort is huge so the slow variant is timed in full and judged by auto itself.
    bench = h.FAST_BENCH | {"slow_abort": 1e6}
    cfg = h.fast_config(methods=["torch-fp32", "test-slow", "test-broken"], bench=bench)
    result = optimize(bert, cfg, h.agreement_metric(h.spec_of(bert)), tmp_path)

    assert result.chosen == "torch-fp32"
    slow, broken = result.cards["test-slow"], result.cards["test-broken"]
    assert slow.status == "passed" and slow.speedup is not None and slow.speedup < 1
    assert "slower than the baseline" in slow.reasons[0]
    assert broken.status == "rejected"
    assert any("quality" in r for r in broken.reasons)
    assert any("parity" in r for r in broken.reasons)
    assert EvalCard.read(tmp_path / "variants" / "test-broken").status == "rejected"
    summary = json.loads((tmp_path / "optimize.json").read_text())
    assert summary["chosen"] == "torch-fp32"
    assert summary["decision"]["considered"]["torch-fp32"].startswith("baseline (kept")


@pytest.mark.usefixtures("test_variants")
def test_a_variant_stopped_as_too_slow_is_skipped_not_gated(bert: Path, tmp_path: Path) -> None:
    cfg = h.fast_config(methods=["torch-fp32", "test-slow"], bench=h.FAST_BENCH | {"slow_abort": 2})
    result = optimize(bert, cfg, h.agreement_metric(h.spec_of(bert)), tmp_path)
    card = result.cards["test-slow"]
    assert result.chosen == "torch-fp32"
    assert card.status == "skipped" and card.quality is None
    assert "slower than the baseline" in card.reasons[0]
    larger = card.timing(4, 16)
    assert larger is not None and larger["aborted"].startswith("skipped")


def test_unknown_method_names_the_valid_ones(bert: Path) -> None:
    with pytest.raises(ValidationError, match="unknown optimization method 'int3-magic'"):
        OptimizeConfig(methods=["int3-magic"])
    with pytest.raises(ConfigError) as err:
        load_optimize_config({"target": "int3-magic"})
    assert "target" in str(err.value) and "onnx-int8-dynamic" in str(err.value)
    with pytest.raises(ConfigError, match="valid: torch-fp32, torch-bf16"):
        ModelOptimizer(bert, lambda runner: 1.0).quantize(Path("unused"), method="int3-magic")


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"bench\.max_runs: max_runs \(2\) < min_runs \(5\) — fix: set max_runs >= min_runs",
    ):
        load_optimize_config({"bench": {"min_runs": 5, "max_runs": 2}})
    with pytest.raises(ConfigError, match="unknown field 'gate.quantisation'"):
        load_optimize_config({"gate": {"quantisation": 0.9}})
    path = tmp_path / "opt.yaml"
    path.write_text("target: onnx-fp32\nbench:\n  batch_sizes: [32, 1, 32]\n")
    cfg = load_optimize_config(path, ["gate.quantization=0.95"])
    assert cfg.bench.batch_sizes == [1, 32] and cfg.gate.quantization == 0.95


def test_default_candidates_follow_the_hardware(
    bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelkiln.optimize.api import select_variants
    from modelkiln.optimize.quantize import TorchBf16Variant

    monkeypatch.setattr(TorchBf16Variant, "not_default_here", lambda self: "no fast bf16 here")
    names, skipped, explicit = select_variants(h.spec_of(bert), OptimizeConfig())
    assert names[0] == "torch-fp32" and "torch-bf16" not in names and not explicit
    assert skipped["torch-bf16"] == "no fast bf16 here"
    names, skipped, explicit = select_variants(
        h.spec_of(bert), OptimizeConfig(methods=["torch-bf16"])
    )
    assert names == ["torch-fp32", "torch-bf16"] and explicit and "torch-bf16" not in skipped
