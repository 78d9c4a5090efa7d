"""Token choice and text output: sampling, incremental detokenization, stop strings.

- :func:`sample_tokens` picks one token per row of a logits batch: greedy
  (``temperature == 0``, ``torch.argmax`` like ``generate(do_sample=False)``) or
  sampling with temperature, top-k and top-p. Each sampled row draws its random
  number from its own ``torch.Generator`` (seeded from ``SamplingParams.seed``),
  and every transform is row-wise, so a seeded request gives the same tokens
  whatever else is in the batch.
- :class:`IncrementalDetokenizer` turns a request's tokens into text deltas that
  never end in half a UTF-8 character, detects stop strings on the decoded text,
  trims them (and anything after) from the output, and holds back a tail that
  might still become a stop string, so no stop text is ever streamed.

Example:
    >>> params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1)]
    >>> sample_tokens(logits, params, [make_generator(p) for p in params])  # one id per row
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelkiln.serve.generation.api import SamplingParams

if TYPE_CHECKING:
    import torch

__all__ = ["IncrementalDetokenizer", "is_greedy", "make_generator", "sample_tokens", "token_scores"]

#: Prompt tokens decoded as context so the first output token gets its leading space right.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``params`` means argmax decoding (temperature 0 or top_k 1)."""
    return params.temperature <= 0.0 or params.top_k == 1


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded from ``params.seed`` (random seed when None); None when greedy."""
    import torch

    if is_greedy(params):
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` ``[B, vocab]`` (fp32), following each row's params.

    Args:
        logits: next-token logits, one row per request.
        params: each row's sampling settings.
        generators: each row's generator (from :func:`make_generator`; None for greedy rows).
    """
    import torch

    assert logits.shape[0] == len(params) == len(generators)
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not is_greedy(p)]
    if not rows:
        return [int(t) for t in tokens]
    # Each row's path depends only on its own params, so batch composition never matters.
    plain = [i for i in rows if params[i].top_k <= 0 and params[i].top_p >= 1.0]
    filtered = [i for i in rows if i not in plain]
    for group, pick in ((plain, _sample_plain), (filtered, _sample_filtered)):
        if group:
            chosen = [params[i] for i in group]
            index = torch.tensor(group, device=logits.device)
            temps = torch.tensor([p.temperature for p in chosen], device=logits.device)
            scaled = logits.index_select(0, index).float() / temps.unsqueeze(1)
            # One uniform draw per row, from that row's own generator.
            uniform = torch.stack([torch.rand((), generator=generators[i]) for i in group])
            picked = pick(scaled, chosen, uniform.to(logits.device)).tolist()
            for row, token in zip(group, picked, strict=True):
                tokens[row] = token
    return [int(t) for t in tokens]


def token_scores(
    logits: torch.Tensor, tokens: Sequence[int], wanted: Sequence[bool]
) -> list[tuple[float, float] | None]:
    """``(log p(token), entropy)`` of each wanted row's untempered distribution, else None.

    Only the wanted rows pay (one exp pass over the vocabulary each); a step with no
    wanted row returns at once. On CPU it runs in numpy on a view of the logits (no
    torch op, no copy when every row asks): this runs on the engine thread in every
    step a scored request is in, and there per-call overhead is the cost. Each extra
    call also stretches the gap between the model's parallel regions, which costs
    more than the call itself when torch's intra-op threads share the cores with the
    event loop, so the path is kept to the few numpy calls that are needed: the
    chosen token's log-prob ``z[token] - lse`` and the entropy ``lse - sum(e * z) /
    sum(e)`` with ``z = x - max(x)``, ``e = exp(z)``, ``lse = log(sum(e))``.
    """
    import numpy as np

    out: list[tuple[float, float] | None] = [None] * len(tokens)
    rows = [i for i, w in enumerate(wanted) if w]
    if not rows:
        return out
    if logits.device.type != "cpu":
        return _token_scores_torch(logits, tokens, rows, out)
    x = logits.float().numpy()  # fp32 logits: a view
    if len(rows) < len(tokens):
        x = x[rows]
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1)
    lse = np.log(total)
    ez = np.einsum("ij,ij->i", e, z)  # sum(e * z) without the product array
    if np.isnan(ez).any():  # masked tokens (-inf): 0 * log 0 counts as 0
        with np.errstate(invalid="ignore"):
            ez = np.nansum(e * z, axis=1)
    entropy = lse - ez / total
    chosen = z[np.arange(len(rows)), [tokens[i] for i in rows]] - lse
    for row, lp, h in zip(rows, chosen.tolist(), entropy.tolist(), strict=True):
        out[row] = (lp, h)
    return out


def _token_scores_torch(
    logits: torch.Tensor,
    tokens: Sequence[int],
    rows: list[int],
    out: list[tuple[float, float] | None],
) -> list[tuple[float, float] | None]:
    """:func:`token_scores` on the logits' own device (accelerators)."""
    import torch

    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))
    entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)  # 0 * log 0 counts as 0
    for row, lp, h in zip(rows, chosen.squeeze(1).tolist(), entropy.tolist(), strict=True):
        out[row] = (float(lp), float(h))
    return out


def _sample_plain(
    scaled: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor
) -> torch.Tensor:
    """Sample from the full softmax of temperature-scaled logits."""
    import torch

    return _inverse_cdf(torch.softmax(scaled, dim=-1), uniform)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k`` with ``cdf[k-1] <= u * total < cdf[k]`` (never a zero-mass token)."""
    import torch

    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return picked.clamp(max=probs.shape[-1] - 1)


def _sample_filtered(
    scaled: torch.Tensor, params: Sequence[SamplingParams], uniform: torch.Tensor
) -> torch.Tensor:
    """Sample with top-k then top-p (nucleus) filtering, HF ``generate`` semantics."""
    import torch

    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=scaled.device)
    probs = torch.softmax(sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), -torch.inf), -1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=scaled.device)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= top_p.unsqueeze(1)) & (ranks > 0), 0.0)
    picked = _inverse_cdf(probs, uniform)
    return sorted_ids.gather(1, picked.unsqueeze(1)).squeeze(1)


class IncrementalDetokenizer:
    """Text deltas for a growing token sequence, with stop-string handling.

    Args:
        tokenizer: a transformers tokenizer.
        prompt_ids: the prompt (its last tokens give the first output token its context).
        stop: stop strings; output ends before the first one that appears.

    Example:
        >>> detok = IncrementalDetokenizer(tok, prompt_ids, stop=("\\n\\n",))
        >>> "".join(detok.push(t) for t in ids) + detok.flush()
        'def f():'
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        # The Rust tokenizer's own decode when transformers' wrapper would add nothing to it (no
        # space clean-up): the wrapper's argument handling costs more than the decode itself,
        # and this runs twice per generated token.
        backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._raw_decode = backend.decode if backend is not None and not clean_up else None
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self.text = ""  # output text so far (held-back tail included, stop string excluded)
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted = 0  # chars of self.text already returned

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit ("" while incomplete)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # an incomplete UTF-8 sequence (or nothing new): wait for more tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._add(full[len(prefix) :])

    def flush(self) -> str:
        """At the end of generation: return every character still held back."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            self._read_offset = len(self._ids)
            tail = self._add(full[len(prefix) :])
        else:
            tail = ""
        if self.stopped:
            return tail
        rest, self._emitted = self.text[self._emitted :], len(self.text)
        return tail + rest

    def _add(self, delta: str) -> str:
        self.text += delta
        if self.stop:
            hits = [i for s in self.stop if (i := self.text.find(s, self._emitted)) >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                out, self._emitted = self.text[self._emitted :], len(self.text)
                return out
        safe = len(self.text) - self._held_back()
        out, self._emitted = self.text[self._emitted : safe], max(self._emitted, safe)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self.text[self._emitted :]
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _decode(self, ids: Sequence[int]) -> str:
        if self._raw_decode is not None:
            return str(self._raw_decode(ids, skip_special_tokens=True))
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
