"""Admission control: a model's queue is bounded by requests, tokens AND estimated wait.

A request is admitted (or refused with 429) right after its input is
tokenized — before it reaches a batcher or an engine, so an overloaded server
spends nothing on work it cannot finish. Admitted requests hold a
:class:`Ticket` until they finish; releasing it frees its share of the budgets.

The wait bound is what protects admitted requests: the controller measures
the model's **service rate** (tokens finished per *busy* second, a time-weighted
EWMA —
seconds with at least one request queued or running, so an idle server does
not look slow) and refuses a request whose estimated wait, queued tokens /
rate, passes ``max_wait_s``. A fixed count alone admits 256 requests whether
they take 1 s or 20 s to drain; the estimate keeps admitted latency near
``max_wait_s`` + service time whatever the inputs' lengths and the CPU.
Until a rate is measured (the first completions finish) at most
``cold_requests`` are queued: a flood arriving at a fresh server would
otherwise all be admitted before the first batch says how slow it is. The
embedding engine times one full batch when it starts and the server records it
here (:meth:`record_batch`), so a served encoder has a rate before its first request.

Why not CoDel: CoDel sheds on the *sojourn* time of requests already queued,
i.e. after the server has parsed, tokenized and queued them; the estimate
refuses at the door, before the work is accepted, and :meth:`over` lets the
HTTP layer refuse before the body is even parsed (see :mod:`.early`).

An engine that knows when it computes (the embedding engine: each batch's compute
seconds and tokens) reports it through :meth:`AdmissionController.record_batch`; the
rate is then tokens per *computing* second. The busy-time rate also counts the
50 ms an input waits for its batch to fill while the model idles: below
saturation it read the model at about half its speed, so a burst after a quiet
spell was refused at ~2.5 s of real work under a 5 s bound.

A batched engine's speed depends on its batch: MiniLM (128-token inputs, 2 threads,
class B CPU, loaded machine) computed 350 / 1,440 tokens/s at batch 1 / 16 in fp32,
590 / 2,370 in bf16.
Below saturation (the soak's 70 % load) the batches are small, so one rate over
all batches reads the model at its small-batch speed; a burst then queues
enough tokens to fill whole batches and drains at the large-batch speed, but
was refused against the small-batch one (the soak saw 429s at 70 % load).
:class:`BatchRates` keeps one rate per batch size (its tokens, power-of-two
buckets) and estimates a queue's wait at the rate of the largest batches that
queue can form when the engine is not running such batches now (the largest
measured bucket not above the queued tokens; buckets not measured for
``max_age_s`` are left out, so a rate from a quieter machine long ago does not
admit too much). A saturated engine keeps the rate over all its recent batches:
its full batches alone would read it faster than it drains (it also runs partial
ones), and admitted latency would pass the bound.

``Retry-After`` is the time the measured rate needs to drain the excess.

Example:
    >>> gate = AdmissionController(max_requests=2, max_tokens=100)
    >>> with gate.admit(60):
    ...     gate.admit(60)   # raises Overloaded: 120 tokens > 100
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from types import TracebackType

from modelkiln.errors import ServingError

log = logging.getLogger(__name__)


class Overloaded(ServingError):
    """The queue is full; ``reason`` is ``queue_requests``, ``queue_tokens`` or ``queue_wait``."""

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


class ServiceRate:
    """Tokens finished per busy second, exponentially weighted over busy time (time constant tau).

    Both sums decay by ``exp(-busy / tau)`` as busy time passes, so the rate is an
    EWMA weighted by time, not by event: a dynamic batch finishes many requests at
    one instant, and per-completion samples would swing between a whole batch time
    and zero. 0.0 until ``min_busy_s`` of busy time holds finished tokens.

    Args:
        tau_s: busy seconds after which old work weighs 1/e (2 s: a few batches).
        min_busy_s: busy seconds needed before the rate is trusted.
    """

    def __init__(self, tau_s: float = 2.0, min_busy_s: float = 0.05) -> None:
        self.tau_s = tau_s
        self.min_busy_s = min_busy_s
        self._tokens = 0.0
        self._busy = 0.0

    @property
    def rate(self) -> float:
        """Tokens per busy second (0.0: not measured yet)."""
        if self._busy < self.min_busy_s or self._tokens <= 0:
            return 0.0
        return self._tokens / self._busy

    def add(self, busy_s: float, tokens: int) -> None:
        """Account ``busy_s`` more busy seconds and ``tokens`` more finished tokens."""
        if busy_s > 0:
            keep = math.exp(-busy_s / self.tau_s)
            self._tokens *= keep
            self._busy = self._busy * keep + busy_s
        self._tokens += tokens


class BatchRates:
    """Tokens per computing second by batch size: a :class:`ServiceRate` per bucket.

    A batch of ``t`` tokens falls in bucket ``t.bit_length()`` (power-of-two ranges).
    :meth:`rate_for` answers the rate at which ``queued`` tokens drain:

    - while batches as large as that queue can form ran in the last ``recent_s`` (a
      saturated engine), the rate over all recent batches: their mix of full and partial
      batches is how the queue drains;
    - otherwise (a burst after a quiet spell of small batches) the rate of the largest
      bucket measured in the last ``max_age_s`` that is not above the queue's, at least
      the overall rate: the batches that queue will fill.

    Args:
        tau_s: busy seconds after which old batches weigh 1/e (overall and per bucket).
        recent_s: wall seconds within which a bucket counts as running now.
        max_age_s: a bucket not measured for this long is not used (the machine may
            have changed since).
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        tau_s: float = 2.0,
        recent_s: float = 2.0,
        max_age_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tau_s = tau_s
        self.recent_s = recent_s
        self.max_age_s = max_age_s
        self.overall = ServiceRate(tau_s)
        self._clock = clock
        self._buckets: dict[int, tuple[ServiceRate, float]] = {}  # bucket -> (rate, last seen)

    def add(self, seconds: float, tokens: int) -> None:
        """One batch: ``tokens`` computed in ``seconds``."""
        self.overall.add(seconds, tokens)
        bucket = max(tokens, 1).bit_length()
        rate = self._buckets[bucket][0] if bucket in self._buckets else ServiceRate(self.tau_s)
        rate.add(seconds, tokens)
        self._buckets[bucket] = (rate, self._clock())

    def describe(self) -> str:
        """The measured rates by batch size, for logs: ``<=tokens: rate (age s)``."""
        now = self._clock()
        parts = [
            f"<={(1 << b) - 1}: {rate.rate:.0f} ({now - seen:.0f} s ago)"
            for b, (rate, seen) in sorted(self._buckets.items())
        ]
        return ", ".join(parts) + f"; overall {self.overall.rate:.0f}"

    def rate_for(self, queued: int) -> float:
        """Tokens per second at which ``queued`` tokens drain (0.0: not measured yet)."""
        now = self._clock()
        fresh = {
            b: rate.rate
            for b, (rate, seen) in self._buckets.items()
            if now - seen <= self.max_age_s and rate.rate > 0
        }
        if not fresh:
            return self.overall.rate
        target = max(queued, 1).bit_length()
        reach = min(target, max(fresh))  # the largest batches this queue can form
        running = [b for b, (_, seen) in self._buckets.items() if now - seen <= self.recent_s]
        if running and max(running) >= reach:
            return self.overall.rate
        below = [b for b in fresh if b <= target]
        chosen = max(below) if below else min(fresh)
        return max(fresh[chosen], self.overall.rate)


class AdmissionController:
    """Counts admitted, unfinished requests and their tokens; refuses past any bound.

    Args:
        max_requests: most admitted, unfinished requests.
        max_tokens: most tokens they may hold together. A single request larger
            than this is still admitted when the queue is empty (it cannot starve).
        max_wait_s: most estimated queue wait (queued tokens / measured rate); None: no bound.
        cold_requests: most queued requests while no rate is measured yet (with ``max_wait_s``).
        slots: requests the engine runs at once (a continuous-batching engine's
            ``max_num_seqs``; 0: none). While fewer than ``slots`` are admitted a new one
            starts at the next step and waits for nothing, so the wait bound does not
            apply: queued tokens / rate is when the whole lot *finishes* (the new request
            decoding beside them), not a wait — 32 streams x 160 tokens at ~1,000 tokens/s
            read as 5.1 s and were refused at 32 concurrent streams, the engine's own size.
        clock: seconds, monotonic (tests pass a fake one, e.g. ``FakeClock().now``).
    """

    def __init__(
        self,
        max_requests: int,
        max_tokens: int,
        *,
        max_wait_s: float | None = None,
        cold_requests: int = 32,
        slots: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_requests = max_requests
        self.slots = slots
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.cold_requests = cold_requests
        self.requests = 0
        self.tokens = 0
        self.service = ServiceRate()
        self.batches = BatchRates(clock=clock)  # the rate once an engine reports its batches
        self._clock = clock
        self._mark = clock()  # time of the last admit / release (busy time counts from it)
        self.typical_tokens = (
            0.0  # EWMA of admitted requests' tokens: the size :meth:`over` assumes
        )
        self.engine_reported = False  # True once record_batch was called: the rate is the engine's
        self._logged = -math.inf  # when the last refusal was logged (at most one per 10 s)

    def rate(self, queued: int | None = None) -> float:
        """Tokens per second at which ``queued`` tokens (default: the queue's) drain; 0.0: unknown.

        An engine that reports its batches: the rate of the batches that queue can form
        (:class:`BatchRates`); otherwise tokens finished per busy second.
        """
        if not self.engine_reported:
            return self.service.rate
        return self.batches.rate_for(self.tokens if queued is None else queued)

    def estimated_wait(self, tokens: int = 0) -> float:
        """Seconds the queue (plus ``tokens``) needs to drain at the measured rate (0: unknown)."""
        queued = self.tokens + tokens
        rate = self.rate(queued)
        return queued / rate if rate > 0 else 0.0

    def over(self) -> Overloaded | None:
        """Why a new request would be refused even before its size is known, or None.

        The HTTP layer asks this before parsing a body: a request that would be
        refused anyway costs no JSON parsing and no tokenization.
        """
        if self.requests >= self.max_requests:
            return self._full_by_count()
        if self.requests and self.tokens >= self.max_tokens:
            return Overloaded(
                "queue_tokens",
                self._retry_after(self.tokens - self.max_tokens + 1),
                f"{self.tokens} tokens are queued (max_queued_tokens={self.max_tokens})",
            )
        typical = round(self.typical_tokens)  # the size is unknown before parsing: assume usual
        if self.requests and self._too_long(typical):
            return self._full_by_wait(typical)
        return None

    def admit(self, tokens: int) -> Ticket:
        """Admit a request holding ``tokens``; raise :class:`Overloaded` when full."""
        if self.requests >= self.max_requests:
            raise self._full_by_count()
        if self.requests and self.tokens + tokens > self.max_tokens:
            raise Overloaded(
                "queue_tokens",
                self._retry_after(self.tokens + tokens - self.max_tokens),
                f"{self.tokens} tokens are queued and this request adds {tokens} "
                f"(max_queued_tokens={self.max_tokens})",
            )
        if self.requests and self._too_long(tokens):
            raise self._full_by_wait(tokens)
        if not self.engine_reported:
            self.service.add(self._tick(), 0)
        self.typical_tokens += (
            0.1 * (tokens - self.typical_tokens) if self.typical_tokens else tokens
        )
        self.requests += 1
        self.tokens += tokens
        return Ticket(self, tokens)

    def record_batch(self, seconds: float, tokens: int) -> None:
        """An engine's report: ``tokens`` computed in ``seconds`` (then the rate is this alone)."""
        self.engine_reported = True
        self.service.add(seconds, tokens)
        self.batches.add(seconds, tokens)

    def _release(self, tokens: int) -> None:
        busy = self._tick()
        self.requests -= 1
        self.tokens -= tokens
        assert self.requests >= 0 and self.tokens >= 0
        if not self.engine_reported:
            self.service.add(busy, tokens)

    def _tick(self) -> float:
        """Move the mark to now; the busy seconds since the last mark (0 if the queue was empty)."""
        now = self._clock()
        busy = now - self._mark if self.requests else 0.0
        self._mark = now
        return max(busy, 0.0)

    def throughput(self) -> float:
        """The measured service rate over all batches, tokens per second (0.0: not yet)."""
        return self.service.rate

    def _too_long(self, tokens: int) -> bool:
        if self.max_wait_s is None or self.requests < self.slots:
            return False
        if self.service.rate <= 0:
            return self.requests >= self.cold_requests
        return self.estimated_wait(tokens) > self.max_wait_s

    def _full_by_count(self) -> Overloaded:
        excess = self.tokens // max(self.requests, 1)  # one average request must finish
        return Overloaded(
            "queue_requests",
            self._retry_after(excess),
            f"{self.requests} requests are queued (max_queued_requests={self.max_requests})",
        )

    def _full_by_wait(self, tokens: int) -> Overloaded:
        wait = self.estimated_wait(tokens)
        assert self.max_wait_s is not None
        if self.service.rate <= 0:
            return Overloaded(
                "queue_wait",
                1,
                f"{self.requests} requests are queued and no service rate is measured yet "
                f"(at most {self.cold_requests} until the first ones finish)",
            )
        rate = self.rate(self.tokens + tokens)
        excess = self.tokens + tokens - self.max_wait_s * rate
        now = self._clock()
        if now - self._logged >= 10.0:  # what the estimate was made of, for the operator
            self._logged = now
            log.info(
                "refusing (queue_wait): %d requests / %d tokens queued, about %.1f s at %.0f "
                "tokens/s; rates by batch tokens: %s",
                self.requests, self.tokens + tokens, wait, rate,
                self.batches.describe() if self.engine_reported else "not reported",
            )  # fmt: skip
        return Overloaded(
            "queue_wait",
            self._retry_after(math.ceil(excess)),
            f"the queue needs about {wait:.1f} s to drain at the measured "
            f"{rate:.0f} tokens/s (max_queue_wait_s={self.max_wait_s:g})",
        )

    def _retry_after(self, excess_tokens: int) -> int:
        rate = self.rate()
        if rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(excess_tokens / rate))))
