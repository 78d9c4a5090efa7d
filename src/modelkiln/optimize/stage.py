"""The ``optimize`` pipeline stage and ``kiln optimize model``: real data in, variants out.

Resolves the input (HF directory, train artifact, PEFT adapter — see
:mod:`modelkiln.optimize.sources`), builds the held-out quality metric and the
training batches from a data-stage artifact, and runs
:func:`modelkiln.optimize.api.optimize`. Stage layout (``out``)::

    source/          the merged fp32 model, when the input had an adapter
    variants/<name>/ every variant with its eval card
    model/           the promoted variant (absent when none passed)
    report.md        the comparison table (the run report's "Optimize" section)
    comparison.png, optimize.json

Example:
    >>> result = optimize_source("runs/q/train", "runs/q/data", OptimizeConfig(), Path("out"))
    >>> result.chosen
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import EVAL_CARD, MODEL_DIR, SOURCE_DIR, VARIANT_JSON
from modelkiln.errors import DataError, StageError
from modelkiln.optimize.config import OptimizeConfig, OptimizeDataConfig
from modelkiln.progress import QUIET, Progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from modelkiln.optimize.api import OptimizeResult
    from modelkiln.optimize.gate import QualityMetric
    from modelkiln.stages import StageContext


def _spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (deterministic), or all of them."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _chunks(texts: list[str], size: int) -> list[str]:
    out = []
    for text in texts:
        out += [text[i : i + size] for i in range(0, len(text), size) if text[i : i + size].strip()]
    return out


def _corpus_split(data_dir: Path, split: str) -> list[str]:
    from modelkiln.contract.corpus import load_corpus

    corpus = load_corpus(data_dir)
    texts = list(corpus[split]["text"]) if split in corpus else []
    if not texts:
        raise DataError(
            f"{data_dir}: the corpus has no {split!r} texts to optimize with",
            hint="rebuild the data stage with a larger corpus (data.max_files)",
        )
    return texts


def lm_data(
    data_dir: Path, tokenizer: PreTrainedTokenizerBase, cfg: OptimizeDataConfig
) -> tuple[QualityMetric, list[dict[str, torch.Tensor]]]:
    """Held-out perplexity (corpus ``test`` split) and packed training batches (``train``)."""
    from modelkiln.contract.corpus import pack_texts
    from modelkiln.optimize.gate import perplexity_metric

    held_out = _spread(_chunks(_corpus_split(data_dir, "test"), cfg.chunk_chars), cfg.eval_texts)
    metric = perplexity_metric(held_out, tokenizer, max_length=cfg.max_length)
    batches: list[dict[str, torch.Tensor]] = []
    if cfg.train_batches:
        need = cfg.train_batches * cfg.train_batch_size * cfg.train_seq_len
        texts = _spread(_corpus_split(data_dir, "train"), 4 * cfg.train_batches)
        blocks = pack_texts(texts, tokenizer, cfg.train_seq_len, max_tokens=need)
        for i in range(0, len(blocks) - cfg.train_batch_size + 1, cfg.train_batch_size):
            ids = blocks[i : i + cfg.train_batch_size]
            batches.append({"input_ids": ids, "attention_mask": ids.new_ones(ids.shape)})
    return metric, batches[: cfg.train_batches]


def encoder_data(
    data_dir: Path, tokenizer: PreTrainedTokenizerBase, cfg: OptimizeDataConfig
) -> tuple[QualityMetric, list[dict[str, torch.Tensor]]]:
    """Held-out code-search MRR@10 (pairs ``test`` split) and padded training batches."""
    from modelkiln.contract.corpus import load_pairs
    from modelkiln.optimize.gate import code_search_metric

    pairs = load_pairs(data_dir)
    test = _spread(list(zip(pairs["test"]["docstring"], pairs["test"]["code"], strict=True)),
                   cfg.eval_pairs)  # fmt: skip
    if len(test) < 2:
        raise DataError(
            f"{data_dir}: fewer than 2 held-out code-search pairs",
            hint="rebuild the data stage with data.pairs.enabled and more files",
        )
    metric = code_search_metric(
        [d for d, _ in test], [c for _, c in test], tokenizer, max_length=cfg.max_length
    )
    batches: list[dict[str, torch.Tensor]] = []
    if cfg.train_batches:
        train = pairs["train"]
        texts = _spread(list(train["docstring"]) + list(train["code"]),
                        cfg.train_batches * cfg.train_batch_size)  # fmt: skip
        for i in range(0, len(texts), cfg.train_batch_size):
            enc = tokenizer(texts[i : i + cfg.train_batch_size], padding=True, truncation=True,
                            max_length=cfg.train_seq_len, return_tensors="pt")  # fmt: skip
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return metric, batches


def optimize_source(
    source: str | Path,
    data_dir: str | Path,
    cfg: OptimizeConfig | None,
    out: Path,
    progress: Progress = QUIET,
) -> OptimizeResult:
    """Optimize any accepted input, measuring quality on a data-stage artifact's held-out split.

    Args:
        source: HF model directory, train artifact or PEFT adapter directory.
        data_dir: a data-stage artifact (``kiln data build``): held-out texts and pairs.
        cfg: the optimize config (None: defaults).
        out: the output directory (see the module docstring).
        progress: progress sink.

    Raises:
        ConfigError / DataError / QualityGateError: see :func:`prepare_source` and
            :func:`modelkiln.optimize.api.optimize`.
    """
    from transformers import AutoTokenizer

    from modelkiln.optimize.api import optimize
    from modelkiln.optimize.runners import inspect_model
    from modelkiln.optimize.sources import prepare_source

    cfg = cfg or OptimizeConfig()
    data = Path(data_dir)
    if not (data / "manifest.json").is_file():
        raise DataError(
            f"{data} is not a data-stage artifact",
            hint="build one with: kiln data build (then pass --data runs/<run>/data)",
        )
    out.mkdir(parents=True, exist_ok=True)
    progress.message(f"optimize input: {source}")
    src = prepare_source(source, out / SOURCE_DIR)
    spec = inspect_model(src.model_dir, cfg.task)
    tokenizer = AutoTokenizer.from_pretrained(str(src.model_dir))
    build = lm_data if spec.task == "causal-lm" else encoder_data
    metric, batches = build(data, tokenizer, cfg.data)
    result = optimize(src.model_dir, cfg, metric, out, progress, batches)
    _stage_report(result, src.to_dict() | {"dir": _rel(src.model_dir, out)})
    return result


def load_section(path: str | Path | None, overrides: list[str]) -> OptimizeConfig:
    """An optimize config from YAML (a bare section, or a pipeline config's ``optimize:``).

    Overrides may be written relative to the section (``target=onnx-fp32``) or with the
    pipeline prefix (``optimize.target=onnx-fp32``).

    Raises:
        ConfigError: the file is missing or malformed, or a field is invalid.
    """
    from modelkiln.configbase import load_section as load_config_section
    from modelkiln.optimize.config import OptimizeConfig

    return load_config_section(OptimizeConfig, path, overrides, section="optimize")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _stage_report(result: OptimizeResult, source: dict[str, Any]) -> None:
    """Turn optimize()'s report into the run report's ``## Optimize`` section."""
    if result.report_path is None:
        return
    lines = result.report_path.read_text(encoding="utf-8").splitlines()
    title = lines[0].lstrip("# ").strip() if lines else "Optimization"
    intro = f"{title}; input `{source['given']}` ({source['kind']})"
    if source.get("merge"):
        m = source["merge"]
        intro += (
            f", adapter merged first: max |diff| {m['max_abs_diff']:.2e} in memory, "
            f"{m['reload_max_abs_diff']:.2e} reloaded (tolerance {m['atol']:.0e})"
        )
    body = "\n".join(["## Optimize", "", intro + ".", *lines[1:]])
    result.report_path.write_text(body + "\n", encoding="utf-8")


def stage_metrics(result: OptimizeResult, source_dir: str) -> dict[str, Any]:
    """The numbers the stage records in its manifest."""
    metrics: dict[str, Any] = {
        "chosen": result.chosen or "none",
        "source_dir": source_dir,
        "variants": {},
    }
    for name, card in result.cards.items():
        quality = card.quality or {}
        metrics["variants"][name] = {
            "status": card.status,
            "speedup": card.speedup,
            "quality": quality.get("value"),
            "quality_ratio": quality.get("ratio"),
        }
        if name == result.chosen:
            metrics["chosen_speedup"] = card.speedup
            metrics["chosen_quality_ratio"] = quality.get("ratio")
            metrics["quality_metric"] = quality.get("metric")
            metrics["baseline_quality"] = quality.get("baseline")
    return metrics


def run_optimize_stage(ctx: StageContext) -> None:
    """Pipeline entry point: optimize the train stage's model on the data stage's held-out data.

    Raises:
        StageError: the train or data artifact is missing.
    """
    cfg = ctx.config
    assert isinstance(cfg, OptimizeConfig)
    for need in ("train", "data"):
        if need not in ctx.inputs:
            raise StageError(
                f"the optimize stage needs the {need!r} artifact",
                hint=f"add '{need}' before 'optimize' in stages",
            )
    result = optimize_source(
        ctx.inputs["train"].path, ctx.inputs["data"].path, cfg, ctx.out, ctx.progress
    )
    source = SOURCE_DIR if (ctx.out / SOURCE_DIR).is_dir() else "train/model"
    ctx.metrics.update(stage_metrics(result, source))
    _final_paths(ctx.out, ctx.pipeline.run_dir / "optimize")


def _final_paths(tmp: Path, final: Path) -> None:
    """Point paths written while the stage ran (in its temporary directory) at its final one."""
    texts = [tmp / "report.md", tmp / "optimize.json"]
    texts += [*tmp.glob("variants/*/eval_card.json"), *tmp.glob("variants/*/variant.json")]
    texts += [*tmp.glob("*/merge.json"), *tmp.glob("variants/*/merge.json")]
    texts += [tmp / MODEL_DIR / EVAL_CARD, tmp / MODEL_DIR / VARIANT_JSON]
    for path in texts:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            path.write_text(text.replace(str(tmp), str(final)), encoding="utf-8")
