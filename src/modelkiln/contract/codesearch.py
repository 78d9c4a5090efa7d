"""Code-search quality: embed texts with an encoder and score docstring -> code retrieval.

The shared measure of an encoder on the data stage's code-search pairs: the
train stage reports it for the fine-tuned encoder, the optimize stage gates
every variant on it (a variant's :class:`~modelkiln.optimize.runners.Runner`
is called like an HF model, so the same code scores it). Mean pooling over
the attention mask then L2 normalization, the sentence-transformers recipe.

Example:
    >>> m = evaluate_code_search(model, tok, pairs["docstring"], pairs["code"], k=10)
    >>> m["mrr@10"], m["recall@1"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from modelkiln.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["embed_batch", "encode", "evaluate_code_search", "retrieval_metrics"]


def embed_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    pooling: str,
    bf16: bool,
) -> torch.Tensor:
    """Normalized embeddings ``(len(texts), hidden)`` of one batch, with autograd if enabled."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def encode(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 128,
    *,
    pooling: Literal["mean", "cls"] = "mean",
    bf16: bool = False,
) -> torch.Tensor:
    """L2-normalized embeddings ``(len(texts), hidden)`` in fp32 on the CPU, in input order.

    Texts are batched longest-first so each batch pads little; the model runs in eval mode.
    """
    import torch

    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            parts.append(embed_batch(model, tokenizer, chunk, max_length, pooling, bf16).cpu())
    model.train(was_training)
    if not parts:
        return torch.empty(0, 0)
    out = torch.empty(len(texts), parts[0].shape[1])
    out[torch.tensor(order)] = torch.cat(parts)
    return out


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor, k: int = 10) -> dict[str, float]:
    """MRR@k, recall@1 and recall@k of ``queries[i]`` retrieving ``docs[i]`` among all ``docs``.

    Scores are dot products (cosine for normalized rows). The rank of the
    positive is 1 + the number of documents scoring strictly higher (ties
    favour the positive; exact duplicate codes are removed before evaluating).
    """
    import torch

    scores = queries.float() @ docs.float().T  # (N, N)
    positive = scores.diagonal().unsqueeze(1)
    rank = 1 + (scores > positive).sum(dim=1)  # (N,)
    reciprocal = torch.where(
        rank <= k, 1.0 / rank.float(), torch.zeros_like(rank, dtype=torch.float)
    )
    return {
        f"mrr@{k}": float(reciprocal.mean()),
        "recall@1": float((rank == 1).float().mean()),
        f"recall@{k}": float((rank <= k).float().mean()),
        "n": len(rank),
    }


def evaluate_code_search(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    docstrings: list[str],
    codes: list[str],
    k: int = 10,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    pooling: Literal["mean", "cls"] = "mean",
    bf16: bool = False,
) -> dict[str, float]:
    """Retrieve each docstring's own code among all ``codes``; see :func:`retrieval_metrics`."""
    if len(docstrings) != len(codes) or len(codes) < 2:
        raise DataError(f"need >= 2 aligned pairs to evaluate, got {len(docstrings)}/{len(codes)}")
    opts: dict[str, Any] = {"pooling": pooling, "bf16": bf16}
    q = encode(model, tokenizer, docstrings, batch_size, max_length, **opts)
    d = encode(model, tokenizer, codes, batch_size, max_length, **opts)
    return retrieval_metrics(q, d, k)
