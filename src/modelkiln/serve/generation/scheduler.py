"""Iteration-level (continuous) batching: who runs in the next model step.

Pure logic, no torch: the engine asks :meth:`Scheduler.schedule` for a
:class:`SchedulerOutput`, has the model runner execute it, and reports the
sampled tokens back with :meth:`Scheduler.update`. Time comes from an
injectable :class:`Clock`, so tests drive it with :class:`FakeClock`.

Each step:

1. requests past their deadline leave (waiting or running);
2. every running request decodes one token (1 token of budget each);
3. waiting requests are admitted in arrival order (strict FIFO: the head of the
   queue is never overtaken) while ``max_num_seqs`` and ``max_batched_tokens``
   (prompt tokens of new requests + 1 per running decode) allow. A prompt longer
   than the token budget is admitted alone once the batch is empty, so it
   cannot starve.

Requests leave when they finish (``max_tokens``, an EOS token, a stop string,
the model's context length), are cancelled, or pass their deadline; their KV
cache rows are handed to the runner to free (``SchedulerOutput.released``)
before the next step runs.

Example:
    >>> sched = Scheduler(SchedulerConfig(max_num_seqs=2), clock=FakeClock())
    >>> sched.add(GenerationRequest("a", [1, 2, 3], SamplingParams(max_tokens=1)))
    >>> [s.request_id for s in sched.schedule().prefill]
    ['a']
    >>> sched.update({"a": 7})[0].reason
    'length'
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from modelkiln.errors import ConfigError, ServingError
from modelkiln.serve.clock import Clock, FakeClock, MonotonicClock
from modelkiln.serve.generation.api import FinishReason, GenerationRequest, SamplingParams

#: ``error`` text of a request that passed its deadline (finish_reason "cancelled").
DEADLINE_EXCEEDED = "deadline exceeded"

__all__ = [
    "DEADLINE_EXCEEDED",
    "Clock",
    "FakeClock",
    "FinishedRequest",
    "MonotonicClock",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SequenceState",
]


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one model step.

    Args:
        max_num_seqs: most sequences in the running batch.
        max_batched_tokens: most tokens one step processes (new prompts + 1 per decode).
        max_model_len: longest sequence, prompt + output (the model's context length).
    """

    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(
                f"max_num_seqs must be >= 1, got {self.max_num_seqs}", hint="use e.g. 32"
            )
        if self.max_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be >= max_num_seqs"
                f" ({self.max_num_seqs}): every running sequence decodes one token per step",
                hint=f"set max_batched_tokens to at least {self.max_num_seqs}",
            )


@dataclass
class SequenceState:
    """A request's progress inside the scheduler."""

    request: GenerationRequest
    output_ids: list[int] = field(default_factory=list)
    status: Literal["waiting", "running", "finished"] = "waiting"

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        """The request's sampling settings."""
        return self.request.params

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return len(self.request.prompt_ids)

    @property
    def last_token(self) -> int:
        """The token to feed at the next decode step."""
        return self.output_ids[-1]


@dataclass(frozen=True)
class FinishedRequest:
    """A request that left the scheduler, and why."""

    request_id: str
    reason: FinishReason
    error: str | None = None


@dataclass(frozen=True)
class SchedulerOutput:
    """What the model runner executes in one step.

    Attributes:
        prefill: newly admitted requests; run their prompts (yields their first token).
        decode: running requests; feed each its last token. Always the whole running batch.
        released: request ids whose KV cache must be freed BEFORE this step runs.
        expired: requests that passed their deadline since the last step.
        num_batched_tokens: prompt tokens of ``prefill`` + one per ``decode``.
    """

    prefill: list[SequenceState]
    decode: list[SequenceState]
    released: list[str]
    expired: list[FinishedRequest]
    num_batched_tokens: int

    @property
    def has_model_work(self) -> bool:
        """Whether the runner has a forward pass to do."""
        return bool(self.prefill or self.decode)


class Scheduler:
    """Continuous-batching scheduler (see the module docstring).

    Args:
        config: the step budgets.
        clock: time source for deadlines.
        eos_token_ids: tokens that end a sequence with finish_reason "stop".
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        clock: Clock | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.config = config or SchedulerConfig()
        self.clock: Clock = clock or MonotonicClock()
        self.eos_token_ids = frozenset(eos_token_ids)
        self._waiting: deque[SequenceState] = deque()
        self._running: dict[str, SequenceState] = {}
        self._to_release: list[str] = []

    # ---------------------------------------------------------------- queries
    @property
    def num_waiting(self) -> int:
        """Requests queued, not yet admitted."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    def has_work(self) -> bool:
        """Whether a call to :meth:`schedule` would give the runner anything to do."""
        return bool(self._waiting or self._running or self._to_release)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._running)

    def running_ids(self) -> list[str]:
        """Ids of the running batch, in admission order."""
        return list(self._running)

    def request_ids(self) -> list[str]:
        """Ids of every unfinished request (running first, then waiting in order)."""
        return list(self._running) + [s.request_id for s in self._waiting]

    # ---------------------------------------------------------------- changes
    def add(self, request: GenerationRequest) -> SequenceState:
        """Queue a request at the back of the waiting queue.

        Raises:
            ServingError: empty prompt, ``max_tokens`` < 1, duplicate id, or a prompt
                that leaves no room to generate within ``max_model_len``.
        """
        rid = request.request_id
        if rid in self._running or any(s.request_id == rid for s in self._waiting):
            raise ServingError(f"request id '{rid}' is already queued", hint="use unique ids")
        if not request.prompt_ids:
            raise ServingError("the prompt has no tokens", hint="send a non-empty prompt")
        if request.params.max_tokens < 1:
            raise ServingError(
                f"max_tokens must be >= 1, got {request.params.max_tokens}", hint="use e.g. 16"
            )
        limit = self.config.max_model_len
        if limit is not None and len(request.prompt_ids) >= limit:
            raise ServingError(
                f"the prompt has {len(request.prompt_ids)} tokens; the model's context is {limit}",
                hint=f"send at most {limit - 1} prompt tokens",
            )
        seq = SequenceState(request)
        self._waiting.append(seq)
        return seq

    def cancel(self, request_id: str, error: str | None = None) -> FinishedRequest | None:
        """Remove a request (waiting or running); None if it is not here (already finished)."""
        if request_id in self._running:
            self._finish(self._running.pop(request_id))
            self._to_release.append(request_id)
            return FinishedRequest(request_id, "cancelled", error)
        for seq in self._waiting:
            if seq.request_id == request_id:
                self._waiting.remove(seq)
                self._finish(seq)
                return FinishedRequest(request_id, "cancelled", error)
        return None

    def schedule(self) -> SchedulerOutput:
        """Pick the next step: expire, decode every running request, admit FIFO within budgets."""
        expired = self._expire(self.clock.now())
        decode = list(self._running.values())
        tokens = len(decode)
        prefill: list[SequenceState] = []
        cfg = self.config
        while self._waiting and len(decode) + len(prefill) < cfg.max_num_seqs:
            head = self._waiting[0]
            alone = not decode and not prefill
            if tokens + head.prompt_len > cfg.max_batched_tokens and not alone:
                break
            self._waiting.popleft()
            head.status = "running"
            self._running[head.request_id] = head
            prefill.append(head)
            tokens += head.prompt_len
        released, self._to_release = self._to_release, []
        return SchedulerOutput(prefill, decode, released, expired, tokens)

    def update(
        self, sampled: Mapping[str, int], stopped: Collection[str] = ()
    ) -> list[FinishedRequest]:
        """Record one sampled token per request of the last step; return those that finished.

        Args:
            sampled: request id -> token sampled this step (ids cancelled meanwhile are ignored).
            stopped: ids whose decoded text hit a stop string with this token.
        """
        finished = []
        limit = self.config.max_model_len
        for rid, token in sampled.items():
            seq = self._running.get(rid)
            if seq is None:
                continue
            seq.output_ids.append(token)
            reason: FinishReason | None = None
            if rid in stopped or token in self.eos_token_ids:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or (
                limit is not None and seq.prompt_len + len(seq.output_ids) >= limit
            ):
                reason = "length"
            if reason is not None:
                del self._running[rid]
                self._finish(seq)
                self._to_release.append(rid)
                finished.append(FinishedRequest(rid, reason))
        return finished

    def abort_all(self, error: str | None = None) -> list[FinishedRequest]:
        """Cancel every unfinished request (shutdown past its drain timeout)."""
        return [f for rid in self.request_ids() if (f := self.cancel(rid, error)) is not None]

    # ---------------------------------------------------------------- helpers
    def _expire(self, now: float) -> list[FinishedRequest]:
        late = [
            seq.request_id
            for seq in (*self._running.values(), *self._waiting)
            if seq.request.deadline is not None and now >= seq.request.deadline
        ]
        return [f for rid in late if (f := self.cancel(rid, DEADLINE_EXCEEDED)) is not None]

    @staticmethod
    def _finish(seq: SequenceState) -> None:
        seq.status = "finished"
