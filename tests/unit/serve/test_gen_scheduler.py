"""Continuous-batching scheduler: pure logic, fake clock, fake model runner (no torch)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest

from modelkiln.errors import ConfigError, ServingError
from modelkiln.serve.generation.api import GenerationRequest, SamplingParams
from modelkiln.serve.generation.scheduler import (
    DEADLINE_EXCEEDED,
    FakeClock,
    FinishedRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

EOS = 0


def req(
    rid: str, prompt_len: int = 3, max_tokens: int = 4, deadline: float | None = None
) -> GenerationRequest:
    return GenerationRequest(
        rid, [5] * prompt_len, SamplingParams(max_tokens=max_tokens), 0.0, deadline
    )


class FakeRunner:
    """Mimics the backend's contract: released rows first, decode covers the whole batch."""

    def __init__(self, script: Mapping[str, list[int]] | None = None) -> None:
        self.rows: list[str] = []
        self.script = {k: list(v) for k, v in (script or {}).items()}

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        self.rows = [r for r in self.rows if r not in set(out.released)]
        assert sorted(s.request_id for s in out.decode) == sorted(self.rows)
        assert not {s.request_id for s in out.prefill} & set(self.rows)
        self.rows += [s.request_id for s in out.prefill]
        return {s.request_id: self._next(s.request_id) for s in out.decode + out.prefill}

    def _next(self, rid: str) -> int:
        tokens = self.script.get(rid)
        return tokens.pop(0) if tokens else 7


def step(
    sched: Scheduler, runner: FakeRunner, stopped: set[str] | None = None
) -> tuple[SchedulerOutput, list[FinishedRequest]]:
    out = sched.schedule()
    return out, sched.update(runner.execute(out), stopped or set())


def ids(seqs: list) -> list[str]:
    return [s.request_id for s in seqs]


def test_requests_join_between_decode_steps_and_leave_when_done() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=4)), FakeRunner()
    sched.add(req("a", max_tokens=4))
    out, _ = step(sched, runner)
    assert (ids(out.prefill), ids(out.decode)) == (["a"], [])
    out, _ = step(sched, runner)
    assert (ids(out.prefill), ids(out.decode)) == ([], ["a"])
    sched.add(req("b", max_tokens=2))
    out, _ = step(sched, runner)
    assert (ids(out.prefill), ids(out.decode)) == (["b"], ["a"])  # joins mid-flight
    out, finished = step(sched, runner)
    assert ids(out.decode) == ["a", "b"]
    assert finished == [FinishedRequest("a", "length"), FinishedRequest("b", "length")]
    out = sched.schedule()
    assert out.released == ["a", "b"] and not out.has_model_work
    runner.execute(out)
    assert runner.rows == [] and not sched.has_work()


def test_eos_and_stop_string_finish_with_stop_and_free_the_slot() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), eos_token_ids={EOS})
    runner = FakeRunner({"a": [3, EOS]})
    for rid in "abc":
        sched.add(req(rid, max_tokens=10))
    step(sched, runner)
    _, finished = step(sched, runner)
    assert finished == [FinishedRequest("a", "stop")]
    out, _ = step(sched, runner)
    assert out.released == ["a"] and ids(out.prefill) == ["b"]
    _, finished = step(sched, runner, stopped={"b"})
    assert finished == [FinishedRequest("b", "stop")]
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["c"]


def test_max_num_seqs_caps_the_batch() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=2)), FakeRunner()
    for i in range(5):
        sched.add(req(f"r{i}", max_tokens=2 + i))
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["r0", "r1"] and sched.num_waiting == 3
    _, finished = step(sched, runner)
    assert [f.request_id for f in finished] == ["r0"]
    out, _ = step(sched, runner)
    assert ids(out.decode) == ["r1"] and ids(out.prefill) == ["r2"]


def test_max_batched_tokens_counts_prompts_and_one_per_decode() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=16)), FakeRunner()
    for rid in "abc":
        sched.add(req(rid, prompt_len=6, max_tokens=5))
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["a", "b"] and out.num_batched_tokens == 12
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["c"] and out.num_batched_tokens == 2 + 6
    sched.add(req("d", prompt_len=14))
    out, _ = step(sched, runner)
    assert out.prefill == [] and out.num_batched_tokens == 3  # 3 decodes + 14 > 16


def test_fifo_head_is_never_overtaken() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=10)), FakeRunner()
    sched.add(req("a", prompt_len=2, max_tokens=3))
    step(sched, runner)
    sched.add(req("big", prompt_len=10))
    sched.add(req("small", prompt_len=1))
    out, _ = step(sched, runner)
    assert out.prefill == []  # "small" would fit, but "big" is first in line
    step(sched, runner)  # "a" finishes
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["big"]


def test_prompt_longer_than_token_budget_runs_alone() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=4, max_batched_tokens=8)), FakeRunner()
    sched.add(req("huge", prompt_len=20, max_tokens=1))
    sched.add(req("next", prompt_len=2, max_tokens=1))
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["huge"] and out.num_batched_tokens == 20
    out, _ = step(sched, runner)
    assert ids(out.prefill) == ["next"]


def test_cancel_waiting_and_running() -> None:
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=1)), FakeRunner()
    sched.add(req("a", max_tokens=10))
    sched.add(req("b", max_tokens=10))
    sched.add(req("c", max_tokens=1))
    step(sched, runner)
    assert sched.cancel("b") == FinishedRequest("b", "cancelled")
    out = sched.schedule()  # "a" decodes; cancel it while the step is "in flight"
    assert sched.cancel("a") == FinishedRequest("a", "cancelled")
    assert sched.update(runner.execute(out)) == []  # its token is dropped
    out = sched.schedule()
    assert out.released == ["a"] and ids(out.prefill) == ["c"] and out.decode == []
    assert sched.cancel("a") is None and sched.cancel("nope") is None


def test_deadlines_expire_waiting_and_running_requests() -> None:
    clock = FakeClock(100.0)
    sched, runner = Scheduler(SchedulerConfig(max_num_seqs=1), clock=clock), FakeRunner()
    sched.add(req("run", max_tokens=50, deadline=105.0))
    sched.add(req("wait", max_tokens=50, deadline=102.0))
    sched.add(req("free", max_tokens=2))
    step(sched, runner)
    clock.advance(2.0)
    out, _ = step(sched, runner)
    assert out.expired == [FinishedRequest("wait", "cancelled", DEADLINE_EXCEEDED)]
    assert ids(out.decode) == ["run"]
    clock.advance(3.0)
    out, _ = step(sched, runner)
    assert out.expired == [FinishedRequest("run", "cancelled", DEADLINE_EXCEEDED)]
    assert out.released == ["run"] and ids(out.prefill) == ["free"] and out.decode == []


def test_context_length_ends_with_length() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_model_len=6))
    runner = FakeRunner()
    sched.add(req("a", prompt_len=4, max_tokens=100))
    step(sched, runner)
    _, finished = step(sched, runner)
    assert finished == [FinishedRequest("a", "length")]
    with pytest.raises(ServingError, match="context is 6"):
        sched.add(req("long", prompt_len=6))


def test_invalid_requests_and_configs() -> None:
    sched = Scheduler()
    with pytest.raises(ServingError, match="no tokens"):
        sched.add(GenerationRequest("e", []))
    with pytest.raises(ServingError, match="max_tokens"):
        sched.add(req("z", max_tokens=0))
    sched.add(req("dup"))
    with pytest.raises(ServingError, match="already queued"):
        sched.add(req("dup"))
    with pytest.raises(ConfigError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="max_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_batched_tokens=4)


@pytest.mark.parametrize("seed", range(5))
def test_random_traffic_keeps_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=4, max_batched_tokens=24)
    clock = FakeClock()
    sched, runner = Scheduler(cfg, clock=clock, eos_token_ids={EOS}), FakeRunner()
    arrived: list[str] = []
    admitted: list[str] = []
    ended: dict[str, str] = {}
    for t in range(300):
        if t < 200 and rng.random() < 0.4:
            rid = f"r{t}"
            deadline = clock.now() + rng.uniform(1, 30) if rng.random() < 0.2 else None
            sched.add(req(rid, rng.randint(1, 30), rng.randint(1, 12), deadline))
            arrived.append(rid)
            runner.script[rid] = [rng.choice([EOS, 3, 4, 5, 6]) for _ in range(12)]
        if sched.request_ids() and rng.random() < 0.05:
            rid = rng.choice(sched.request_ids())
            assert sched.cancel(rid) is not None
            ended[rid] = "cancelled"
        out = sched.schedule()
        assert len(out.decode) + len(out.prefill) <= cfg.max_num_seqs
        alone = len(out.prefill) == 1 and not out.decode
        assert out.num_batched_tokens <= cfg.max_batched_tokens or alone
        admitted += ids(out.prefill)
        for f in [*out.expired, *sched.update(runner.execute(out))]:
            assert f.request_id not in ended
            ended[f.request_id] = f.reason
        clock.advance(0.1)
    while sched.has_work():
        out = sched.schedule()
        for f in [*out.expired, *sched.update(runner.execute(out))]:
            ended[f.request_id] = f.reason
    assert admitted == [r for r in arrived if r in admitted]  # admission in arrival order
    assert set(ended) == set(arrived) and runner.rows == []
