"""The optimize stage's inputs and data: HF dirs, PEFT adapters (merged with a parity check),
held-out metrics from a real data artifact, and the CLI around them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import train_helpers as th  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from modelkiln.cli import app  # noqa: E402
from modelkiln.config import DataConfig, PipelineConfig  # noqa: E402
from modelkiln.errors import ConfigError, DataError  # noqa: E402
from modelkiln.optimize.config import OptimizeConfig  # noqa: E402
from modelkiln.optimize.sources import prepare_source  # noqa: E402
from modelkiln.optimize.stage import load_section, optimize_source  # noqa: E402
from modelkiln.pipeline import run_pipeline  # noqa: E402

FAST: dict[str, Any] = {
    "bench": {"batch_sizes": [1, 2], "seq_lengths": [16], "warmup": 0, "min_runs": 1,
              "max_runs": 2, "max_seconds": 0.5, "threads": 1},
    "data": {"eval_texts": 4, "eval_pairs": 6, "max_length": 32, "train_batches": 2,
             "train_batch_size": 2, "train_seq_len": 16},
    "min_speedup": 1.0,
}  # fmt: skip


def _tree(root: Path) -> Path:
    for i in range(10):
        pkg = root / f"pkg{i}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f'"""Package {i}."""\nVALUE = {i}\n')
        (pkg / "util.py").write_text(
            f"class Tool{i}:\n    def run(self, x):\n"
            f'        """Run tool number {i} on x and return the sum."""\n'
            f"        total = x + {i}\n        return total * {i + 1}\n"
        )
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real data artifact (fake source tree), a tokenizer, a tiny GPT-2 and a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("optstage")
    data_cfg = DataConfig(source=str(_tree(root / "src")), validation_fraction=0.2,
                          test_fraction=0.3, humaneval=False)  # fmt: skip
    cfg = PipelineConfig(run="t", runs_dir=root / "runs", stages=["data"], data=data_cfg)
    data = run_pipeline(cfg, report=None).outcome("data").artifact
    assert data is not None
    tok = AutoTokenizer.from_pretrained(str(th.make_tokenizer(root, data.path) / "tokenizer"))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, eos_token_id=tok.eos_token_id))  # fmt: skip
    lm = root / "gpt2"
    gpt2.save_pretrained(lm)
    tok.save_pretrained(lm)
    lora = LoraConfig(
        r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    adapter = root / "adapter"
    get_peft_model(gpt2, lora).save_pretrained(adapter)
    cfg_path = adapter / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(meta | {"base_model_name_or_path": str(lm)}))
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64))  # fmt: skip
    enc = root / "bert"
    bert.save_pretrained(enc)
    tok.save_pretrained(enc)
    return {"data": data.path, "lm": lm, "adapter": adapter, "encoder": enc}


def test_adapter_is_merged_with_parity_and_differs_from_its_base(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    src = prepare_source(inputs["adapter"], tmp_path / "merged")

    assert src.kind == "peft-adapter" and src.model_dir == tmp_path / "merged"
    assert src.merge is not None and src.merge["reload_max_abs_diff"] <= src.merge["atol"]
    ids = torch.arange(10).unsqueeze(0)
    merged = AutoModelForCausalLM.from_pretrained(src.model_dir)(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(inputs["lm"])(input_ids=ids).logits
    assert (merged - base).abs().max() > 1e-3, "a non-trivial adapter changes the logits"
    assert (src.model_dir / "tokenizer.json").is_file()


def test_bad_inputs_get_one_clear_error(inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        prepare_source(tmp_path / "missing", tmp_path / "w")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no model"):
        prepare_source(tmp_path / "empty", tmp_path / "w")
    with pytest.raises(DataError, match="not a data-stage artifact"):
        optimize_source(inputs["lm"], tmp_path / "empty", None, tmp_path / "o")


def test_causal_lm_is_optimized_on_held_out_perplexity(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = OptimizeConfig.model_validate(FAST | {"methods": ["torch-fp32", "onnx-fp32"]})

    result = optimize_source(inputs["adapter"], inputs["data"], cfg, tmp_path / "out")

    base = result.cards["torch-fp32"].quality
    assert base is not None and base["metric"] == "perplexity" and base["value"] > 1.0
    onnx = result.cards["onnx-fp32"].quality
    assert onnx is not None and abs(onnx["ratio"] - 1.0) < 1e-3
    assert (tmp_path / "out" / "source" / "merge.json").is_file()
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("## Optimize") and "adapter merged first" in report
    assert result.chosen in {"torch-fp32", "onnx-fp32"}
    assert (tmp_path / "out" / "model" / "variant.json").is_file()


def test_encoder_is_optimized_on_held_out_code_search(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = OptimizeConfig.model_validate(FAST | {"target": "onnx-fp32"})

    result = optimize_source(inputs["encoder"], inputs["data"], cfg, tmp_path / "out")

    card = result.cards["onnx-fp32"]
    assert card.quality is not None and card.quality["metric"] == "mrr@10"
    assert 0.0 < card.quality["baseline"] <= 1.0
    assert result.chosen == "onnx-fp32"


def test_section_loader_accepts_bare_and_pipeline_yaml(tmp_path: Path) -> None:
    (tmp_path / "bare.yaml").write_text("target: onnx-fp32\n")
    (tmp_path / "pipe.yaml").write_text("run: x\noptimize: {target: onnx-fp32}\n")
    assert load_section(tmp_path / "bare.yaml", []).target == "onnx-fp32"
    cfg = load_section(tmp_path / "pipe.yaml", ["optimize.min_speedup=1.2"])
    assert cfg.target == "onnx-fp32" and cfg.min_speedup == 1.2
    with pytest.raises(ConfigError, match="unknown optimization method 'int3'"):
        load_section(None, ["target=int3"])


def test_cli_optimize_model_reports_and_rejects_bad_method(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["optimize", "model", str(inputs["lm"]), "--data",
                              str(inputs["data"]), "--out", str(tmp_path / "o"),
                              "--set", "methods=[int3]"])  # fmt: skip
    assert bad.exit_code == 2 and "unknown optimization method 'int3'" in bad.output
    listed = runner.invoke(app, ["optimize", "methods"])
    assert listed.exit_code == 0 and "onnx-int8-dynamic" in listed.output


def test_cli_optimize_cnn_runs_the_plain_pytorch_path(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["optimize", "cnn", "--out", str(tmp_path), "--set", "prune_ratio=2"])
    assert bad.exit_code == 2 and "prune_ratio = 2 is invalid" in bad.output
    quick = ["--set", "epochs=1", "--set", "finetune_epochs=0", "--set", "kd_epochs=1"]
    done = runner.invoke(app, ["optimize", "cnn", "--out", str(tmp_path / "cnn"), *quick])
    assert done.exit_code == 0, done.output
    assert "int8" in done.output and (tmp_path / "cnn" / "comparison.md").is_file()
