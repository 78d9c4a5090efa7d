"""Dynamic batching for encoders: a pure scheduling core and the asyncio engine around it.

:class:`DynamicBatcher` decides, from token counts and arrival times only,
which queued inputs form the next forward pass (no model, no asyncio; tests
drive it with a fake clock, as vLLM tests its scheduler):

- inputs are grouped by **length bucket** (the smallest bucket limit that
  holds them), so a batch pads little;
- a bucket is dispatched as soon as it is **full** — its inputs, padded to the
  longest, reach ``max_batch_tokens`` or ``max_batch_size`` — or when its
  oldest input has waited ``max_wait_s`` (the handbook's 50 ms) *while the
  model was idle*: the wait counts from ``max(arrival, idle_since)``, so after
  a long batch the inputs that queued behind it still get up to ``max_wait_s``
  for the clients it just answered to send their next inputs (under a closed
  loop of N clients, batches stay N wide instead of splitting in two);
- a batch takes inputs first-in first-out up to the token budget; what does
  not fit stays queued for the next batch (a request with many inputs is
  split across batches), and an input longer than the budget runs alone.

:class:`EmbeddingEngine` feeds the batcher from coroutines and runs each batch
on one worker thread through an :class:`EncoderBackend`
(:mod:`modelkiln.serve.encoders`), so the event loop never blocks.

Example:
    >>> batcher = DynamicBatcher(BatchPolicy(max_batch_tokens=256), clock=FakeClock())
    >>> batcher.add(EmbedItem(0, n_tokens=100, arrival=0.0))
    >>> batcher.next_batch() is None        # not full, not old enough
    True
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from modelkiln.errors import ServingError
from modelkiln.serve.clock import Clock, MonotonicClock

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """How batches are formed (see the module docstring)."""

    max_batch_tokens: int = 2048  # see EmbeddingBatchConfig.max_batch_tokens
    max_batch_size: int = 64
    max_wait_s: float = 0.05
    buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)

    def bucket_of(self, n_tokens: int) -> int:
        """The bucket limit of an input; past the largest, the next multiple of it."""
        i = bisect.bisect_left(self.buckets, n_tokens)
        if i < len(self.buckets):
            return self.buckets[i]
        top = self.buckets[-1]
        return -(-n_tokens // top) * top


@dataclass
class EmbedItem:
    """One input waiting for its batch."""

    item_id: int
    n_tokens: int
    arrival: float
    payload: Any = None  # the engine's (token ids, future)


@dataclass
class _Bucket:
    items: list[EmbedItem] = field(default_factory=list)


class DynamicBatcher:
    """Pure batching logic: ``add`` inputs, ask ``next_batch`` what to run now."""

    def __init__(self, policy: BatchPolicy, clock: Clock | None = None) -> None:
        self.policy = policy
        self.clock: Clock = clock or MonotonicClock()
        self._buckets: dict[int, _Bucket] = {}
        self._where: dict[int, int] = {}  # item id -> bucket limit
        self.idle_since = float("-inf")

    def mark_idle(self) -> None:
        """The model just finished a batch: max waits now count from this moment."""
        self.idle_since = self.clock.now()

    @property
    def pending(self) -> int:
        """Inputs queued."""
        return len(self._where)

    def add(self, item: EmbedItem) -> None:
        """Queue an input."""
        limit = self.policy.bucket_of(item.n_tokens)
        self._buckets.setdefault(limit, _Bucket()).items.append(item)
        self._where[item.item_id] = limit

    def remove(self, item_id: int) -> bool:
        """Drop a queued input (its request was cancelled); False if not queued."""
        limit = self._where.pop(item_id, None)
        if limit is None:
            return False
        bucket = self._buckets[limit]
        bucket.items = [i for i in bucket.items if i.item_id != item_id]
        if not bucket.items:
            del self._buckets[limit]
        return True

    def next_due(self) -> float | None:
        """When the oldest queued input reaches its max wait (None if nothing is queued)."""
        heads = [b.items[0].arrival for b in self._buckets.values()]
        if not heads:
            return None
        return max(min(heads), self.idle_since) + self.policy.max_wait_s

    def next_batch(self, *, flush: bool = False, full_only: bool = False) -> list[EmbedItem] | None:
        """The batch to run now, or None to keep waiting.

        ``flush`` ignores the max wait; ``full_only`` (the engine still has a batch
        running) returns only a full batch, which the model can start the moment the
        running one ends.
        """
        if not self._buckets:
            return None
        now = self.clock.now()
        wait = self.policy.max_wait_s
        full = {limit for limit, b in self._buckets.items() if self._is_full(b.items)}
        busy = bool(full) or full_only  # the model has work: idle_since says nothing
        ready = []
        for limit, bucket in self._buckets.items():
            head = bucket.items[0].arrival
            if flush or limit in full:
                ready.append((head, limit))
            elif busy and now - head >= wait:
                # while full batches keep the model busy, idle_since keeps moving: a bucket
                # that does not fill would starve; past its max wait it goes, oldest first.
                ready.append((head, limit))
            elif not busy and now - max(head, self.idle_since) >= wait:
                ready.append((head, limit))
        if not ready:
            return None
        _, limit = min(ready)
        batch = self._plan(limit)
        if full_only and not flush and not self._batch_full(batch):
            return None
        self._commit(batch)
        return batch

    def _is_full(self, items: Sequence[EmbedItem]) -> bool:
        if len(items) >= self.policy.max_batch_size:
            return True
        return len(items) * max(i.n_tokens for i in items) >= self.policy.max_batch_tokens

    def _batch_full(self, batch: Sequence[EmbedItem]) -> bool:
        """No further input of the batch's width fits (count or token budget)."""
        width = max(i.n_tokens for i in batch)
        return (
            len(batch) >= self.policy.max_batch_size
            or (len(batch) + 1) * width > self.policy.max_batch_tokens
        )

    def _plan(self, limit: int) -> list[EmbedItem]:
        """Bucket ``limit``'s inputs first-in first-out within the budget, topped up with the
        oldest shorter inputs of lower buckets that pad by at most half (the bucket rule).

        A bucket boundary then never splits inputs of nearly one length into two part-full
        batches (stdlib slices of ~128 tokens land in buckets 128 and 256)."""
        policy = self.policy
        batch: list[EmbedItem] = []
        longest = 0
        for item in self._buckets[limit].items:
            width = max(longest, item.n_tokens)
            fits = (len(batch) + 1) * width <= policy.max_batch_tokens
            if batch and (not fits or len(batch) >= policy.max_batch_size):
                return batch
            batch.append(item)
            longest = width
        if len(batch) >= policy.max_batch_size or longest > policy.max_batch_tokens:
            return batch
        lower = [b.items for lim, b in self._buckets.items() if lim < limit]
        if not lower:
            return batch
        extra = sorted(
            (i for items in lower for i in items if 2 * i.n_tokens >= longest),
            key=lambda i: i.arrival,
        )
        for item in extra:  # every one is shorter than ``longest``: the width stays
            if len(batch) >= policy.max_batch_size:
                break
            if (len(batch) + 1) * longest > policy.max_batch_tokens:
                break
            batch.append(item)
        return batch

    def _commit(self, batch: list[EmbedItem]) -> None:
        """Take ``batch``'s inputs out of their buckets."""
        taken: dict[int, set[int]] = {}
        for item in batch:
            taken.setdefault(self._where.pop(item.item_id), set()).add(item.item_id)
        for limit, item_ids in taken.items():
            bucket = self._buckets[limit]
            bucket.items = [i for i in bucket.items if i.item_id not in item_ids]
            if not bucket.items:
                del self._buckets[limit]


class EncoderBackend(Protocol):
    """What the engine needs from an encoder runner (called from one worker thread)."""

    tokenizer: Any
    dim: int
    max_length: int

    def encode(self, batch: list[list[int]]) -> np.ndarray:
        """Embed token-id sequences: float32 ``[len(batch), dim]``, pooled (and normalized)."""
        ...

    def warmup(self) -> None:
        """Run a first forward pass so the first request does not pay for it."""
        ...


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did (for metrics)."""

    size: int
    tokens: int
    padded_tokens: int
    queue_seconds: tuple[float, ...]
    seconds: float


CALIBRATION_MAX_RUNS = 20  # full batches timed at most when the server starts


class EmbeddingEngine:
    """Queues inputs from coroutines and runs dynamic batches on one worker thread.

    Up to ``pipeline_depth`` (2) batches are handed to the worker at once: while one runs,
    the next full one waits in the worker's queue, so the model never waits for the event
    loop between batches under load.

    Args:
        backend: the encoder runner.
        policy: batching policy.
        model_name: name reported to clients.
        on_batch: called on the event loop after every batch (metrics).
    """

    pipeline_depth = 2

    def __init__(
        self,
        backend: EncoderBackend,
        policy: BatchPolicy | None = None,
        *,
        model_name: str = "encoder",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self.batcher = DynamicBatcher(policy or BatchPolicy())
        self.on_batch = on_batch
        self._ids = itertools.count()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._accepting = False
        self._stopping = False
        self._running = 0  # inputs submitted to the worker and not yet answered
        self._stats = {"batches": 0.0, "inputs": 0.0, "tokens_in": 0.0, "batch_size": 0.0}

    @property
    def tokenizer(self) -> Any:
        """The backend's tokenizer."""
        return self.backend.tokenizer

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self.backend.dim

    @property
    def max_length(self) -> int:
        """Longest input in tokens."""
        return self.backend.max_length

    async def start(self) -> None:
        """Warm the backend on the worker thread and start the batching loop."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-embed")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.backend.warmup)
        self._wake = asyncio.Event()
        self._accepting, self._stopping = True, False
        self._task = asyncio.create_task(self._loop(), name=f"kiln-embed-{self.model_name}")

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting; finish queued inputs within ``drain_timeout`` s; fail the rest."""
        self._accepting = False
        if self._task is None:
            return
        deadline = time.monotonic() + max(drain_timeout, 0.0)
        while (self.batcher.pending or self._running) and time.monotonic() < deadline:
            self._poke()
            await asyncio.sleep(0.005)
        while (batch := self.batcher.next_batch(flush=True)) is not None:
            for item in batch:
                _fail(item, ServingError("the server shut down before this input ran"))
        self._stopping = True
        self._poke()
        await self._task
        self._task = None
        assert self._executor is not None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Embed token-id sequences (each becomes one queued input); ``[n, dim]`` float32.

        Raises:
            ServingError: the engine is not running (not started or shutting down).
        """
        import numpy as np

        if not self._accepting:
            raise ServingError(
                "the embedding engine is not accepting requests (not started or shutting down)",
                hint="wait for /ready or retry on another replica",
            )
        loop = asyncio.get_running_loop()
        now = self.batcher.clock.now()
        items = []
        for ids in inputs:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            item = EmbedItem(next(self._ids), len(ids), now, (ids, future))
            self.batcher.add(item)
            items.append(item)
        self._poke()
        try:
            rows = [await item.payload[1] for item in items]
        except BaseException:
            for item in items:
                self.batcher.remove(item.item_id)
                item.payload[1].cancel()
            raise
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    def stats(self) -> dict[str, float]:
        """Live numbers: queued inputs, batches run, inputs and tokens embedded, last batch size."""
        return {"waiting": float(self.batcher.pending), "running": float(self._running)} | dict(
            self._stats
        )

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        inflight: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            if not inflight:
                self.batcher.mark_idle()
            self._poke()

        while True:
            batch = None
            if len(inflight) < self.pipeline_depth:
                # With a batch running, queue the next one only when it is full: the worker
                # starts it the moment the running one ends, instead of idling until the
                # event loop has answered the last batch's requests (the hand-off gap).
                batch = self.batcher.next_batch(full_only=bool(inflight))
            if batch is None:
                if self._stopping and not self.batcher.pending and not inflight:
                    return
                due = None if inflight else self.batcher.next_due()
                self._wake.clear()
                timeout = None if due is None else max(0.0, due - self.batcher.clock.now())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            batch = [i for i in batch if not i.payload[1].done()]
            if batch:
                task = loop.create_task(self._run(loop, batch))
                inflight.add(task)
                task.add_done_callback(finished)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[EmbedItem]) -> None:
        assert self._executor is not None
        started = self.batcher.clock.now()
        self._running += len(batch)
        seqs = [item.payload[0] for item in batch]
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.backend.encode, seqs)
        except Exception as exc:  # boundary: one bad batch fails its requests, not the server
            log.exception("embedding batch of %d failed", len(batch))
            for item in batch:
                _fail(item, ServingError(f"the encoder failed on this batch: {exc!r}"))
            return
        finally:
            self._running -= len(batch)
        for item, row in zip(batch, out, strict=True):
            if not item.payload[1].done():
                item.payload[1].set_result(row)
        tokens = sum(len(s) for s in seqs)
        self._stats["batches"] += 1
        self._stats["inputs"] += len(batch)
        self._stats["tokens_in"] += tokens
        self._stats["batch_size"] = len(batch)
        if self.on_batch is not None:
            stats = BatchStats(
                size=len(batch),
                tokens=tokens,
                padded_tokens=len(batch) * max(len(s) for s in seqs),
                queue_seconds=tuple(started - item.arrival for item in batch),
                seconds=time.perf_counter() - t0,
            )
            self.on_batch(stats)

    async def calibrate(self) -> tuple[float, int]:
        """Time full batches of 128-token inputs on the worker: ``(seconds, tokens)``.

        One batch, or as many as fill 0.1 s (at most ``CALIBRATION_MAX_RUNS``).

        The server seeds its queue-wait admission with it before it reports ready, so a
        fresh server knows how fast it drains before the first real batch finishes.
        Without it, 64 clients arriving at once at a fresh MiniLM server (class A) had 32
        of their requests refused: with no rate measured, admission holds the queue at
        ``cold_requests``.

        Raises:
            ServingError: the engine is not started.
        """
        if self._executor is None:
            raise ServingError("the embedding engine is not running", hint="await start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._full_batch)

    def _full_batch(self) -> tuple[float, int]:
        width = max(1, min(128, self.backend.max_length))
        policy = self.batcher.policy
        size = max(1, min(policy.max_batch_size, policy.max_batch_tokens // width))
        batch = [[getattr(self.backend, "pad_id", 0)] * width] * size
        t0, runs = time.perf_counter(), 0
        # a tiny model's batch takes microseconds: repeat it until the timing means something
        # (admission trusts a rate after 0.05 s of measured work)
        while runs < CALIBRATION_MAX_RUNS and (not runs or time.perf_counter() - t0 < 0.1):
            self.backend.encode(batch)
            runs += 1
        return time.perf_counter() - t0, runs * size * width

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()


def _fail(item: EmbedItem, exc: Exception) -> None:
    future = item.payload[1]
    if not future.done():
        future.set_exception(exc)
