"""Output agreement of a shadow pair: causal LMs by greedy-token agreement of the texts,
embeddings by cosine similarity. Pure; the gateway feeds it two JSON responses."""

from __future__ import annotations

import math
from typing import Any


def token_agreement(a: str, b: str) -> float:
    """Share of positions where two greedy outputs agree (whitespace tokens, up to the longer).

    Whitespace tokens stand in for model tokens: both versions may use different
    tokenizers, and the server's JSON answer carries text, not ids.
    """
    ta, tb = a.split(), b.split()
    if not ta and not tb:
        return 1.0
    same = sum(x == y for x, y in zip(ta, tb, strict=False))
    return same / max(len(ta), len(tb))


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors (0 when either is zero or the widths differ)."""
    if len(a) != len(b):
        return 0.0
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def _texts(body: dict[str, Any]) -> list[str]:
    out = []
    for choice in body.get("choices") or []:
        msg = choice.get("message") or {}
        out.append(str(choice.get("text") or msg.get("content") or ""))
    return out


def response_agreement(served: dict[str, Any], shadow: dict[str, Any]) -> float | None:
    """Agreement (0..1) of two OpenAI-shaped answers; None when they cannot be compared."""
    if served.get("data") and shadow.get("data"):
        pairs = zip(served["data"], shadow["data"], strict=False)
        scores = [cosine(a.get("embedding") or [], b.get("embedding") or []) for a, b in pairs]
        return sum(scores) / len(scores) if scores else None
    ta, tb = _texts(served), _texts(shadow)
    if not ta or not tb:
        return None
    scores = [token_agreement(a, b) for a, b in zip(ta, tb, strict=False)]
    return sum(scores) / len(scores)
