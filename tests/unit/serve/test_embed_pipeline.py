"""Encoder batching under load: bucket top-up, no starvation, and the two-deep pipeline of the
embedding engine (the next full batch waits in the worker's queue while one runs)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from modelkiln.errors import ServingError
from modelkiln.serve.clock import FakeClock
from modelkiln.serve.embeddings import BatchPolicy, DynamicBatcher, EmbeddingEngine, EmbedItem


def make(**kw: Any) -> tuple[DynamicBatcher, FakeClock]:
    clock = FakeClock()
    settings: dict[str, Any] = {"max_batch_tokens": 4 * 130, "max_batch_size": 8}
    return DynamicBatcher(BatchPolicy(**(settings | kw)), clock), clock


def add(b: DynamicBatcher, clock: FakeClock, *lengths: int, start: int = 0) -> None:
    for i, n in enumerate(lengths):  # in order of arrival, 1 ms apart
        b.add(EmbedItem(start + i, n, clock.now()))
        clock.advance(0.001)


def ids(batch: list[EmbedItem] | None) -> list[int]:
    assert batch is not None
    return [i.item_id for i in batch]


def test_a_bucket_limit_does_not_split_inputs_of_nearly_one_length() -> None:
    b, clock = make()
    add(b, clock, 130, 127, 128, 129, 126)  # buckets 256, 128, 128, 256, 128
    clock.advance(0.05)
    first = b.next_batch()
    # oldest bucket (256: ids 0, 3) topped up with the oldest 128-bucket inputs, 4 x 130 = budget
    assert ids(first) == [0, 3, 1, 2]
    assert ids(b.next_batch(flush=True)) == [4]
    assert b.pending == 0


def test_top_up_never_pads_an_input_to_more_than_twice_its_length() -> None:
    b, clock = make(max_batch_tokens=8 * 130)
    add(b, clock, 130, 60, 70)  # 60 would pad 130 (more than double), 70 would not
    clock.advance(0.05)
    assert ids(b.next_batch()) == [0, 2]
    assert ids(b.next_batch()) == [1]


def test_a_bucket_that_cannot_fill_is_not_starved_by_a_busy_one() -> None:
    b, clock = make(max_batch_size=4, max_batch_tokens=10_000, buckets=(16, 128))
    add(b, clock, 100)  # alone in bucket 128, never full
    for rnd in range(3):  # a full bucket of short inputs every round; the model never idles
        add(b, clock, 10, 10, 10, 10, start=10 + 4 * rnd)
        batch = b.next_batch()
        b.mark_idle()
        if 0 in ids(batch):
            break
        clock.advance(0.03)
    else:
        pytest.fail("the long input never ran")
    assert rnd == 2  # it went as soon as it had waited max_wait (0.06 s >= 0.05 s)


def test_full_only_returns_nothing_but_a_full_batch() -> None:
    b, clock = make(max_batch_size=3)
    add(b, clock, 10, 10)
    clock.advance(1.0)
    assert b.next_batch(full_only=True) is None  # due, but not full: wait for the running one
    add(b, clock, 10, start=2)
    assert ids(b.next_batch(full_only=True)) == [0, 1, 2]


class GatedBackend:
    """A fake encoder: the vector of a sequence is [sum(ids), len(ids)]; each batch waits on
    the test's gate so the test sees what the engine queues meanwhile."""

    tokenizer: Any = None
    dim = 2
    max_length = 512

    def __init__(self, *, open_gates: bool = False) -> None:
        self.open_gates = open_gates
        self.gates: list[threading.Event] = []
        self.started: list[list[list[int]]] = []
        self.lock = threading.Lock()

    def encode(self, batch: list[list[int]]) -> np.ndarray:
        with self.lock:
            gate = threading.Event()
            if self.open_gates:
                gate.set()
            self.gates.append(gate)
            self.started.append(batch)
        gate.wait(10)
        return np.array([[float(sum(s)), float(len(s))] for s in batch], np.float32)

    def warmup(self) -> None:
        pass


def test_the_next_full_batch_is_queued_while_one_runs_and_answers_keep_their_order() -> None:
    async def scenario() -> None:
        backend = GatedBackend()
        policy = BatchPolicy(max_batch_tokens=10_000, max_batch_size=2, max_wait_s=0.01)
        engine = EmbeddingEngine(backend, policy)
        await engine.start()
        reqs = [[[i + 1] * (i + 1)] for i in range(6)]  # 6 one-input requests, distinct vectors
        tasks = [asyncio.create_task(engine.embed(r)) for r in reqs]
        for _ in range(200):
            await asyncio.sleep(0.005)
            if engine.stats()["running"] == 4:
                break
        # batch 1 runs (blocked on its gate) and batch 2 is already handed to the worker
        assert engine.stats()["running"] == 4 and len(backend.started) == 1
        backend.gates[0].set()
        for _ in range(2000):  # let every later batch through as it starts
            if all(t.done() for t in tasks):
                break
            for gate in list(backend.gates):
                gate.set()
            await asyncio.sleep(0.005)
        out = await asyncio.gather(*tasks)
        for req, vec in zip(reqs, out, strict=True):
            seq = req[0]
            assert vec.tolist() == [[float(sum(seq)), float(len(seq))]]
        assert [len(b) for b in backend.started] == [2, 2, 2]
        await engine.shutdown(1.0)

    asyncio.run(scenario())


def test_a_partial_batch_still_runs_after_its_wait_when_nothing_else_comes() -> None:
    async def scenario() -> None:
        backend = GatedBackend(open_gates=True)
        engine = EmbeddingEngine(backend, BatchPolicy(max_batch_size=8, max_wait_s=0.01))
        await engine.start()
        out = await asyncio.wait_for(engine.embed([[5, 6], [7]]), 5)
        assert out.tolist() == [[11.0, 2.0], [7.0, 1.0]]
        await engine.shutdown(1.0)

    asyncio.run(scenario())


def test_calibrate_times_one_full_batch_of_128_token_inputs() -> None:
    async def scenario() -> tuple[tuple[float, int], list[list[int]]]:
        backend = GatedBackend(open_gates=True)
        engine = EmbeddingEngine(backend, BatchPolicy(max_batch_tokens=1024, max_batch_size=64))
        with pytest.raises(ServingError, match="not running"):
            await engine.calibrate()
        await engine.start()
        seconds_tokens = await engine.calibrate()
        await engine.shutdown(1.0)
        return seconds_tokens, backend.started[-1]

    (seconds, tokens), batch = asyncio.run(scenario())
    assert tokens % 1024 == 0 and 1024 <= tokens <= 20 * 1024 and seconds > 0  # whole batches
    assert len(batch) == 8 and {len(s) for s in batch} == {128}  # 1024 tokens / 128 per input
