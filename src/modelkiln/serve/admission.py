"""Admission control: a model's queue is bounded by requests AND by tokens.

A request is admitted (or refused with 429) right after its input is
tokenized — before it reaches a batcher or an engine, so an overloaded server
spends nothing on work it cannot finish. Admitted requests hold a
:class:`Ticket` until they finish; releasing it frees its share of both budgets.

``Retry-After`` is estimated from the token throughput of recently finished
requests: how long until the excess tokens would have drained.

Example:
    >>> gate = AdmissionController(max_requests=2, max_tokens=100)
    >>> with gate.admit(60):
    ...     gate.admit(60)   # raises Overloaded: 120 tokens > 100
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from modelkiln.errors import ServingError


class Overloaded(ServingError):
    """The queue is full; ``reason`` is ``queue_requests`` or ``queue_tokens``."""

    def __init__(self, reason: str, retry_after: int, detail: str) -> None:
        super().__init__(detail, hint=f"retry after {retry_after} s")
        self.reason = reason
        self.retry_after = retry_after


class Ticket:
    """An admitted request's share of the queue; release it (or use ``with``) when done."""

    def __init__(self, gate: AdmissionController, tokens: int) -> None:
        self._gate = gate
        self.tokens = tokens
        self._released = False

    def release(self) -> None:
        """Give the share back (idempotent)."""
        if not self._released:
            self._released = True
            self._gate._release(self.tokens)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AdmissionController:
    """Counts admitted, unfinished requests and their tokens; refuses past either bound.

    Args:
        max_requests: most admitted, unfinished requests.
        max_tokens: most tokens they may hold together. A single request larger
            than this is still admitted when the queue is empty (it cannot starve).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        max_requests: int,
        max_tokens: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0
        self._clock = clock
        self._done: deque[tuple[float, int]] = deque(maxlen=256)  # (finish time, tokens)

    def admit(self, tokens: int) -> Ticket:
        """Admit a request holding ``tokens``; raise :class:`Overloaded` when full."""
        if self.requests >= self.max_requests:
            raise Overloaded(
                "queue_requests",
                self._retry_after(self.max_tokens // 4),
                f"{self.requests} requests are queued (max_queued_requests={self.max_requests})",
            )
        if self.requests and self.tokens + tokens > self.max_tokens:
            raise Overloaded(
                "queue_tokens",
                self._retry_after(self.tokens + tokens - self.max_tokens),
                f"{self.tokens} tokens are queued and this request adds {tokens} "
                f"(max_queued_tokens={self.max_tokens})",
            )
        self.requests += 1
        self.tokens += tokens
        return Ticket(self, tokens)

    def _release(self, tokens: int) -> None:
        self.requests -= 1
        self.tokens -= tokens
        assert self.requests >= 0 and self.tokens >= 0
        self._done.append((self._clock(), tokens))

    def throughput(self, window_s: float = 10.0) -> float:
        """Tokens per second of requests finished in the last ``window_s`` seconds."""
        now = self._clock()
        recent = [(t, n) for t, n in self._done if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def _retry_after(self, excess_tokens: int) -> int:
        rate = self.throughput()
        if rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess_tokens / rate))))
