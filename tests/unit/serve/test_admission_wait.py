"""Admission by estimated queue wait: the measured service rate, the bound, Retry-After."""

from __future__ import annotations

import pytest

from modelkiln.serve.admission import AdmissionController, BatchRates, Overloaded, ServiceRate
from modelkiln.serve.clock import FakeClock
from modelkiln.serve.config import ModelSpec, ServeConfig


def gate(clock: FakeClock, **kw: object) -> AdmissionController:
    args: dict[str, object] = {"max_requests": 1000, "max_tokens": 10**9, "max_wait_s": 2.0}
    return AdmissionController(**(args | kw), clock=clock.now)  # type: ignore[arg-type]


def serve_at(g: AdmissionController, clock: FakeClock, rate: float, n: int = 20) -> None:
    """Run ``n`` requests of 100 tokens one after another at ``rate`` tokens/s."""
    for _ in range(n):
        t = g.admit(100)
        clock.advance(100 / rate)
        t.release()


def test_rate_is_measured_over_busy_time_only() -> None:
    clock = FakeClock()
    g = gate(clock)
    serve_at(g, clock, rate=1000.0)
    assert g.throughput() == pytest.approx(1000.0, rel=1e-6)
    clock.advance(60)  # idle: must not read as a slow server
    serve_at(g, clock, rate=1000.0, n=3)
    assert g.throughput() == pytest.approx(1000.0, rel=1e-6)


def test_ewma_follows_a_slower_server() -> None:
    r = ServiceRate(tau_s=2.0)
    r.add(1.0, 1000)
    assert r.rate == pytest.approx(1000.0)
    r.add(1.0, 500)
    assert 500 < r.rate < 1000
    for _ in range(20):
        r.add(1.0, 500)
    assert r.rate == pytest.approx(500.0, rel=1e-3)


def test_a_batch_finishing_at_once_gives_one_sample() -> None:
    clock = FakeClock()
    g = gate(clock)
    tickets = [g.admit(100) for _ in range(16)]
    clock.advance(0.8)  # one forward pass of 16 x 100 tokens
    for t in tickets:
        t.release()
    assert g.throughput() == pytest.approx(1600 / 0.8)


def test_before_a_rate_is_measured_only_a_few_requests_queue() -> None:
    clock = FakeClock()
    g = gate(clock, cold_requests=4)
    tickets = [g.admit(10_000) for _ in range(4)]
    refusal = g.over()
    assert refusal is not None and refusal.reason == "queue_wait" and refusal.retry_after == 1
    with pytest.raises(Overloaded, match="no service rate is measured yet"):
        g.admit(1)
    clock.advance(1.0)
    for t in tickets:
        t.release()
    assert g.throughput() == pytest.approx(40_000)  # measured: the wait bound takes over
    assert len([g.admit(10_000) for _ in range(8)]) == 8  # 80 000 tokens = 2.0 s


def test_refuses_past_the_estimated_wait_with_retry_after_from_the_drain_rate() -> None:
    clock = FakeClock()
    g = gate(clock)
    serve_at(g, clock, rate=1000.0)
    held = [g.admit(100) for _ in range(18)]  # 1800 tokens: 1.8 s at 1000 tokens/s
    assert g.estimated_wait() == pytest.approx(1.8)
    with pytest.raises(Overloaded) as info:
        g.admit(600)  # 2.4 s > 2.0 s
    assert info.value.reason == "queue_wait"
    assert info.value.retry_after == 1  # 400 excess tokens at 1000 tokens/s
    assert "max_queue_wait_s=2" in info.value.message
    assert g.over() is None  # a request of the usual size (100 tokens) still fits
    g.max_wait_s = 5.0
    held.append(g.admit(1000))  # 2.8 s queued now
    g.max_wait_s = 2.0
    refusal = g.over()  # what the HTTP layer asks before parsing a body
    assert refusal is not None and refusal.reason == "queue_wait"
    assert refusal.retry_after == 1
    for t in held[:15]:
        t.release()
    assert g.over() is None  # drained below the bound: admitting again


def test_retry_after_scales_with_the_excess() -> None:
    clock = FakeClock()
    g = gate(clock, max_wait_s=1.0)
    serve_at(g, clock, rate=100.0)
    g.admit(100)  # 1.0 s queued
    with pytest.raises(Overloaded) as info:
        g.admit(900)  # 9 s past the bound at 100 tokens/s
    assert info.value.retry_after == 9


def test_count_bound_still_applies() -> None:
    g = gate(FakeClock(), max_requests=2)
    g.admit(1), g.admit(1)
    refusal = g.over()
    assert refusal is not None and refusal.reason == "queue_requests"
    with pytest.raises(Overloaded):
        g.admit(1)


def test_default_queue_wait_comes_from_the_deadline() -> None:
    spec = [ModelSpec(path="m")]
    assert ServeConfig(models=spec).queue_wait_s == 5.0
    assert ServeConfig(models=spec, request_timeout_s=8).queue_wait_s == 2.0
    assert ServeConfig(models=spec, max_queue_wait_s=0.5).queue_wait_s == 0.5
    assert AdmissionController(1, 1).max_wait_s is None  # no wait bound unless configured


def test_an_engine_reporting_its_batches_sets_the_rate_without_the_idle_waits() -> None:
    clock = FakeClock()
    g = gate(clock)
    for _ in range(10):  # each input waits 50 ms for its batch, then computes for 50 ms
        t = g.admit(100)
        clock.advance(0.05)
        g.record_batch(0.05, 100)
        clock.advance(0.05)
        t.release()
    assert g.throughput() == pytest.approx(2000.0, rel=1e-6)  # 100 tokens per 50 ms computed
    # The busy-time rate would have read 1000 (the waits counted) and refused this at 2 s:
    for _ in range(30):
        g.admit(100)  # 3000 tokens queued: 1.5 s at the engine's rate, under the 2 s bound
    with pytest.raises(Overloaded):
        g.admit(1100)  # 4100 tokens: 2.05 s


def test_a_burst_after_small_batches_drains_at_the_large_batch_rate() -> None:
    # Below saturation the engine runs batches of one input (100 tokens in 0.1 s: 1000
    # tokens/s); when a burst fills its batches it runs 16 x 100 tokens in 0.8 s (2000/s).
    clock = FakeClock()
    g = gate(clock)
    g.record_batch(0.8, 1600)  # one burst earlier: the large-batch speed is known
    for _ in range(50):
        clock.advance(0.1)
        g.record_batch(0.1, 100)
    assert g.throughput() < 1200  # over all batches: mostly the small-batch speed
    assert g.rate(1600) == pytest.approx(2000.0)  # a queue that fills a batch
    assert g.rate(100) == pytest.approx(g.throughput())  # one input: what runs now
    held = [g.admit(100) for _ in range(36)]  # 3600 tokens: 1.8 s at 2000/s (3.6 s at 1000/s)
    assert g.over() is None
    with pytest.raises(Overloaded) as info:
        g.admit(600)  # 4200 tokens: 2.1 s > 2.0 s at the large-batch rate
    assert "2000 tokens/s" in info.value.message
    assert len(held) == 36


def test_a_saturated_engine_keeps_the_rate_of_its_recent_batch_mix() -> None:
    # A flood: full batches (2000 tokens/s) alternate with partial ones (1000 tokens/s);
    # the queue drains at the mix, and the full batches' rate alone would admit too much.
    clock = FakeClock()
    g = gate(clock)
    for _ in range(20):
        clock.advance(0.8)
        g.record_batch(0.8, 1600)
        clock.advance(0.4)
        g.record_batch(0.4, 400)
    assert g.rate(20_000) == pytest.approx(g.throughput())
    assert g.rate(20_000) < 1800


def test_a_batch_size_not_measured_for_max_age_is_not_trusted() -> None:
    clock = FakeClock()
    rates = BatchRates(max_age_s=60.0, clock=clock.now)
    rates.add(0.8, 1600)  # 2000 tokens/s, in a quieter minute
    clock.advance(61)
    rates.add(0.2, 100)  # 500 tokens/s now
    clock.advance(5)
    assert rates.rate_for(1600) == pytest.approx(rates.overall.rate)
    rates.add(1.6, 1600)  # a large batch now: measured again (EWMA with the old one)
    clock.advance(5)
    assert rates.overall.rate < rates.rate_for(1600) < 2000
    assert rates.rate_for(50) >= 500  # below every bucket: the smallest (or the overall)


def test_before_any_batch_the_rate_for_a_queue_is_unknown() -> None:
    assert BatchRates().rate_for(1000) == 0.0


def test_a_continuous_batching_engine_with_a_free_slot_admits_past_the_wait_bound() -> None:
    # 32 slots: the 32nd stream starts at once (decodes beside the others), so the
    # drain estimate (when all of them finish) is no wait; the 33rd would queue.
    clock = FakeClock()
    g = gate(clock, slots=32)
    serve_at(g, clock, rate=1000.0)
    held = [g.admit(160) for _ in range(31)]  # 4,960 tokens: 5 s to drain, past 2 s
    assert g.estimated_wait(160) > 2.0 and g.over() is None
    held.append(g.admit(160))  # the 32nd: a free slot
    assert g.over() is not None  # the 33rd waits for a slot: the wait bound applies
    with pytest.raises(Overloaded) as info:
        g.admit(160)
    assert info.value.reason == "queue_wait"
    plain = gate(clock)  # no slots (an encoder's batcher): the bound applies from the start
    serve_at(plain, clock, rate=1000.0)
    kept = [plain.admit(160) for _ in range(12)]  # 1,920 tokens: 1.9 s
    with pytest.raises(Overloaded):
        plain.admit(160)
    for t in held + kept:
        t.release()
