"""Long inputs: truncate to the model's limit (TEI's ``truncate``) or refuse with a clear 400.

The limit comes from the model (sentence-transformers ``max_seq_length``, else
the tokenizer's ``model_max_length``, else the model's position embeddings; see
:func:`modelkiln.serve.encoders._max_length`), capped by ``max_input_tokens``.

Truncation keeps the tokenizer's closing special tokens (BERT's ``[SEP]``):
``[CLS] a b c ... [SEP]`` cut to 5 tokens is ``[CLS] a b c [SEP]``, what
sentence-transformers' ``truncation=True`` gives. Token ids sent by the
client are cut plainly (the client chose them).

A causal LM's prompt is cut from the left (:func:`fit_prompt`): its last tokens,
the ones the continuation follows, are kept, as TGI's ``truncate`` does. The
limit is the model's context minus ``max_tokens`` (minus one when
``max_tokens`` is not given: at least one token must be generated), capped by
``max_input_tokens``.

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
    if len(ids) <= limit or limit < 1:
        return ids  # limit < 1: max_tokens alone fills the context (check_prompt's 400)
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


def fit_prompt(
    ids: list[int],
    *,
    context: int | None,
    max_tokens: int | None,
    max_input_tokens: int,
    truncate: bool,
    model: str,
) -> list[int]:
    """A causal LM's prompt cut to ``context - max_tokens`` (its last tokens), or the 400.

    Unchanged when it fits. Without ``truncate`` a prompt over the limit is refused.

    When ``max_tokens`` alone fills the context nothing can be kept: the prompt is
    returned as it is, for ``check_prompt``'s 400 (lower max_tokens).

    Raises:
        APIError: 400 ``context_length_exceeded`` naming the limit, the length and the flag.
    """
    room = (context - (max_tokens or 1)) if context else max_input_tokens
    limit = min(room, max_input_tokens)
    if len(ids) <= limit or limit < 1:
        return ids  # limit < 1: max_tokens alone fills the context (check_prompt's 400)
    why = f"this model's maximum context length is {context} tokens" if context else ""
    if max_tokens and context:
        why += f" and max_tokens is {max_tokens}"
    if not context or room > max_input_tokens:
        why = f"max_input_tokens of the server is {max_input_tokens}"
    if not truncate:
        raise bad_request(
            f"{model!r}: the prompt has {len(ids)} tokens; the limit is {limit} ({why}). Pass "
            '"truncate": true to keep its last tokens (or start the server with '
            "--auto-truncate), or lower max_tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids[len(ids) - limit :]
