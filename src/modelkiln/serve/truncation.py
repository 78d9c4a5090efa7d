"""Long inputs: truncate to the model's limit (TEI's ``truncate``) or refuse with a clear 400.

The limit comes from the model (sentence-transformers ``max_seq_length``, else
the tokenizer's ``model_max_length``, else the model's position embeddings; see
:func:`modelkiln.serve.encoders._max_length`), capped by ``max_input_tokens``.

Truncation keeps the tokenizer's closing special tokens (BERT's ``[SEP]``):
``[CLS] a b c ... [SEP]`` cut to 5 tokens is ``[CLS] a b c [SEP]``, what
sentence-transformers' ``truncation=True`` gives. Token ids sent by the
client are cut plainly (the client chose them).

Example:
    >>> cut(list(range(10)), limit=4, suffix=1)
    [0, 1, 2, 9]
"""

from __future__ import annotations

from typing import Any

from modelkiln.serve.http_errors import APIError, bad_request


def special_suffix(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends at the end of a text (0 for GPT-2, 1 for BERT).

    Read from the encoding of an empty text and of one word: the closing run is the
    longest tail of the empty encoding that also ends the one-word encoding while its
    head still opens it.
    """
    try:
        empty = list(tokenizer([""])["input_ids"][0])
        word = list(tokenizer(["a"])["input_ids"][0])
    except Exception:  # boundary: a tokenizer that cannot encode these has no template we know
        return 0
    for k in range(len(empty), 0, -1):
        head, tail = empty[: len(empty) - k], empty[len(empty) - k :]
        if word[-k:] == tail and word[: len(head)] == head and len(word) > len(empty):
            return k
    return 0


def cut(ids: list[int], limit: int, suffix: int) -> list[int]:
    """``ids`` shortened to ``limit`` tokens, keeping the last ``suffix`` ones (special tokens)."""
    if len(ids) <= limit:
        return ids
    keep = min(suffix, max(limit - 1, 0))
    head = ids[: limit - keep]
    return head + (ids[len(ids) - keep :] if keep else [])


def too_long(index: int, n_tokens: int, limit: int, model: str, param: str) -> APIError:
    """The 400 for an input over the limit: names the limit, the length and the flag."""
    return bad_request(
        f"input {index} has {n_tokens} tokens; the limit of {model!r} is {limit}. "
        'Pass "truncate": true to cut it to the limit (or start the server with '
        "--auto-truncate)",
        param=param,
        code="context_length_exceeded",
    )


def fit(
    ids: list[list[int]],
    limit: int,
    *,
    truncate: bool,
    suffix: int,
    model: str,
    param: str = "input",
) -> list[list[int]]:
    """Every sequence within ``limit``: cut when ``truncate``, else the first too long one is a 400.

    Raises:
        APIError: 400 ``context_length_exceeded`` naming the limit, the length and the flag.
    """
    out = []
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            if not truncate:
                raise too_long(i, len(seq), limit, model, param)
            seq = cut(seq, limit, suffix)
        out.append(seq)
    return out
