"""In-process token buckets (fake clock): rpm, tpm debt, headers, keys independent."""

from __future__ import annotations

from modelkiln.security.ratelimit import MemoryLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_rpm_bucket_admits_the_limit_then_refills() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock)
    assert [lim.acquire("a", rpm=3, tpm=None).allowed for _ in range(4)] == [True] * 3 + [False]
    refused = lim.acquire("a", rpm=3, tpm=None)
    assert not refused.allowed and 19 < refused.retry_after_s <= 20
    assert refused.headers()["retry-after"] == "20"
    clock.t = 20.0
    assert lim.acquire("a", rpm=3, tpm=None).allowed
    assert lim.acquire("b", rpm=3, tpm=None).allowed  # another key is unaffected


def test_tokens_are_debited_after_the_answer_and_debt_blocks() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock)
    ok = lim.acquire("a", rpm=None, tpm=600)
    assert ok.allowed and ok.headers()["x-ratelimit-remaining-tokens"] == "600"
    lim.debit("a", 600, 900)  # one big answer: 300 in debt
    refused = lim.acquire("a", rpm=None, tpm=600)
    assert not refused.allowed
    assert abs(refused.retry_after_s - 30.0) < 0.01  # 300 tokens at 10 tokens/s
    headers = refused.headers()
    assert headers["x-ratelimit-limit-tokens"] == "600"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["retry-after"] == "30"
    clock.t = 30.1
    assert lim.acquire("a", rpm=None, tpm=600).allowed


def test_long_run_rate_equals_the_limit() -> None:
    clock = Clock()
    lim = MemoryLimiter(clock)
    admitted = 0
    for step in range(6000):  # 10 minutes, one attempt per 0.1 s, 50 tokens each
        clock.t = step * 0.1
        if lim.acquire("a", rpm=None, tpm=1000).allowed:
            lim.debit("a", 1000, 50)
            admitted += 50
    # capacity (1000) + 10 min x 1000/min, within one request's overshoot
    assert abs(admitted - 11_000) <= 50
