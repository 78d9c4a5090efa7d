"""The contract between the HTTP layer and the generation engine.

The HTTP layer turns an OpenAI request into one :class:`GenerationRequest`
per choice (``n`` > 1 submits n requests) and consumes the engine's
:class:`TokenEvent` stream. Closing the stream early (client disconnect)
cancels the request inside the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics; temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Report each token's log-probability and its distribution's entropy (costs a
    # log-softmax over the vocabulary per step; the server asks only for its observers).
    logprobs: bool = False


@dataclass
class GenerationRequest:
    """One sequence to generate."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival: float = 0.0
    deadline: float | None = None  # engine clock time after which the request is abandoned
    adapter: str | None = None  # LoRA adapter loaded at run time (None: the base model)


@dataclass(frozen=True)
class TokenEvent:
    """One step of a request's output; the last event has ``finish_reason`` set."""

    request_id: str
    token_id: int | None
    text: str  # decoded text added by this token (may be "" while a UTF-8 char is incomplete)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprob: float | None = None  # log p(token) under the untempered distribution (params.logprobs)
    entropy: float | None = None  # entropy (nats) of that distribution (params.logprobs)


class GenerationEngine(Protocol):
    """What the HTTP layer needs from a generation engine."""

    model_name: str
    tokenizer: Any  # a transformers tokenizer

    async def start(self) -> None:
        """Load/warm the model and start the step loop."""

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, finish in-flight requests within ``drain_timeout`` s, then stop."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue ``request`` and stream its tokens; closing the iterator cancels it."""
        ...

    def stats(self) -> dict[str, float]:
        """Live numbers for /metrics: running, waiting, batch size, tokens in/out."""
        ...
