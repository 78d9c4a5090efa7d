"""Per-request features, the same in the profile and in the server (cheap, numpy only).

Request features of a text request: ``input_tokens``, ``byte_length``,
``unknown_token_share`` (the tokenizer's unknown token) and
``rare_token_share`` (tokens outside the reference's common ids: seen at
least ``MIN_COUNT`` times in the held-out data). Output features come from
the model: ``output_tokens``, ``mean_logprob``, ``mean_entropy`` and
``finish_reason`` (categorical: ``stop`` / ``length``) for causal LMs,
``confidence`` (max softmax) for classifiers, ``embedding`` for encoders.

Example:
    >>> f = RequestFeaturizer(np.array([1, 2]), vocab_size=8, unk_id=0)
    >>> f.features([1, 2, 5, 0], n_bytes=12)["rare_token_share"]
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: A token is common when the reference holds it at least this many times.
MIN_COUNT = 2
REQUEST_FEATURES = ("input_tokens", "byte_length", "unknown_token_share", "rare_token_share")
CAUSAL_OUTPUT_FEATURES = ("output_tokens", "mean_logprob", "mean_entropy", "finish_reason")


class RequestFeaturizer:
    """Turns one request's token ids into its request features in O(tokens)."""

    def __init__(self, common_ids: np.ndarray, vocab_size: int, unk_id: int | None) -> None:
        size = max(vocab_size, int(common_ids.max()) + 1 if len(common_ids) else 0)
        self.common = np.zeros(size, dtype=bool)
        self.common[common_ids.astype(np.int64)] = True
        self.unk_id = unk_id

    def features(self, ids: Sequence[int] | np.ndarray, n_bytes: int) -> dict[str, float]:
        """The request features of one request."""
        arr = np.asarray(ids, dtype=np.int64)
        n = len(arr)
        if n == 0:
            return {"input_tokens": 0.0, "byte_length": float(n_bytes),
                    "unknown_token_share": 0.0, "rare_token_share": 0.0}  # fmt: skip
        inside = arr < len(self.common)
        common = np.zeros(n, dtype=bool)
        common[inside] = self.common[arr[inside]]
        unk = float(np.mean(arr == self.unk_id)) if self.unk_id is not None else 0.0
        return {
            "input_tokens": float(n),
            "byte_length": float(n_bytes),
            "unknown_token_share": unk,
            "rare_token_share": float(1.0 - common.mean()),
        }


def featurizer_for(extras: dict[str, np.ndarray]) -> RequestFeaturizer:
    """The featurizer of a profile, from its ``common_token_ids`` and ``tokenizer_info``."""
    common = extras.get("common_token_ids", np.empty(0, dtype=np.int64))
    info = extras.get("tokenizer_info", np.array([0, -1]))
    unk = int(info[1]) if len(info) > 1 and int(info[1]) >= 0 else None
    return RequestFeaturizer(common, int(info[0]), unk)


def record_features(fz: RequestFeaturizer, record: Any) -> list[dict[str, Any]]:
    """One feature row per prompt / input of a ``RequestRecord`` (read duck-typed)."""
    prompts = list(getattr(record, "prompt_ids", ()) or ())
    n_bytes = int(getattr(record, "input_bytes", 0) or 0)
    rows: list[dict[str, Any]] = []
    for ids in prompts:  # bytes of a batch are split evenly: the record has one total
        f: dict[str, Any] = fz.features(ids, n_bytes // max(len(prompts), 1))
        if not n_bytes:
            f.pop("byte_length")
        rows.append(f)
    for i, out in enumerate(getattr(record, "outputs", ()) or ()):
        if i >= len(rows):  # more choices than prompts (n > 1): output features only
            rows.append({})
        _output_features(out, rows[i])
    return rows


def _output_features(out: Any, row: dict[str, Any]) -> None:
    tokens = getattr(out, "tokens", 0)
    if tokens:
        row["output_tokens"] = float(tokens)
    finish = getattr(out, "finish_reason", None)
    if finish is not None:
        row["finish_reason"] = str(finish)  # categorical: stop / length (a chi-squared test)
    for name in ("mean_logprob", "mean_entropy"):  # None when the request was not scored
        v = getattr(out, name, None)
        if v is not None:
            row[name] = float(v)
    emb = getattr(out, "embedding", None)
    if emb is not None:
        row["embedding"] = np.asarray(emb, dtype=np.float32).ravel()


def common_ids_leave_one_out(
    ids: list[np.ndarray], vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The common ids of a reference, and each text's rare share without itself counted.

    Leave-one-out, because a live request is never part of the reference: counting
    a text's own tokens would make the reference's rare shares too low.
    """
    size = max([vocab_size] + [int(a.max()) + 1 for a in ids if len(a)])
    total = np.zeros(size, dtype=np.int64)
    for a in ids:
        total += np.bincount(a, minlength=size)
    rare = np.empty(len(ids))
    for i, a in enumerate(ids):
        if len(a) == 0:
            rare[i] = 0.0
            continue
        own = np.bincount(a, minlength=size)
        rare[i] = float(np.mean((total - own)[a] < MIN_COUNT))
    return np.flatnonzero(total >= MIN_COUNT), rare


def token_stats(logits: np.ndarray, chosen: np.ndarray) -> tuple[float, float]:
    """Mean log-prob of the chosen tokens and mean entropy, from ``[steps, vocab]`` logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp = logp[np.arange(len(chosen)), chosen]
    ent = -(np.exp(logp) * logp).sum(axis=-1)
    return float(lp.mean()), float(ent.mean())
