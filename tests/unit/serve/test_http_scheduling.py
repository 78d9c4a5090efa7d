"""Pure pieces of the serving layer under a fake clock: dynamic batcher, admission control,
LRU cache, API keys, config."""

from __future__ import annotations

from pathlib import Path

import pytest
from http_helpers import run

from modelkiln.errors import ConfigError
from modelkiln.serve.access import APIKeys
from modelkiln.serve.admission import AdmissionController, Overloaded
from modelkiln.serve.cache import LRUCache, cache_key
from modelkiln.serve.clock import FakeClock
from modelkiln.serve.config import API_KEYS_ENV, ModelSpec, ServeConfig, load_serve_config
from modelkiln.serve.embeddings import BatchPolicy, DynamicBatcher, EmbedItem


def batcher(**kw: object) -> tuple[DynamicBatcher, FakeClock]:
    clock = FakeClock()
    settings: dict[str, object] = {"max_batch_tokens": 256, "max_batch_size": 8, "max_wait_s": 0.05}
    policy = BatchPolicy(**(settings | kw))  # type: ignore[arg-type]
    return DynamicBatcher(policy, clock), clock


def add(b: DynamicBatcher, clock: FakeClock, *lengths: int, start: int = 0) -> None:
    for i, n in enumerate(lengths):
        b.add(EmbedItem(start + i, n, clock.now()))


def ids(batch: list[EmbedItem] | None) -> list[int]:
    assert batch is not None
    return [i.item_id for i in batch]


def test_waits_for_max_wait_then_dispatches_fifo() -> None:
    b, clock = batcher()
    add(b, clock, 10, 12, 9)
    assert b.next_batch() is None
    assert b.next_due() == pytest.approx(0.05)
    clock.advance(0.049)
    assert b.next_batch() is None
    clock.advance(0.001)
    assert ids(b.next_batch()) == [0, 1, 2]
    assert b.pending == 0 and b.next_batch() is None and b.next_due() is None


def test_full_bucket_dispatches_at_once_by_tokens_and_by_count() -> None:
    b, clock = batcher()
    add(b, clock, 60, 64, 50, 64)  # 4 x 64 padded = 256 = the budget
    assert ids(b.next_batch()) == [0, 1, 2, 3]
    b2, clock2 = batcher(max_batch_size=3)
    add(b2, clock2, 5, 5, 5, 5)
    assert ids(b2.next_batch()) == [0, 1, 2]
    assert b2.next_batch() is None  # the 4th waits for its max wait
    clock2.advance(0.05)
    assert ids(b2.next_batch()) == [3]


def test_max_wait_counts_from_when_the_model_went_idle() -> None:
    b, clock = batcher()
    add(b, clock, 10, 10)  # queued behind a long batch
    clock.advance(1.0)
    b.mark_idle()  # the batch ended: answered clients get max_wait to send again
    assert b.next_batch() is None and b.next_due() == pytest.approx(1.05)
    add(b, clock, 10, 10, start=2)
    clock.advance(0.05)
    assert ids(b.next_batch()) == [0, 1, 2, 3]


def test_length_buckets_keep_short_and_long_inputs_apart() -> None:
    b, clock = batcher(buckets=(16, 64))
    add(b, clock, 5, 60, 7, 50)
    clock.advance(0.05)
    first, second = ids(b.next_batch()), ids(b.next_batch())
    assert sorted([first, second]) == [[0, 2], [1, 3]]
    assert BatchPolicy(buckets=(16, 64)).bucket_of(65) == 128  # past the top: multiples of it


def test_budget_splits_a_big_request_and_oversized_inputs_run_alone() -> None:
    b, clock = batcher(max_batch_tokens=100, buckets=(512,))
    add(b, clock, 30, 30, 30, 30, 30)  # 3 x 30 fit in 100, the rest waits
    assert ids(b.next_batch()) == [0, 1, 2]
    clock.advance(0.05)
    assert ids(b.next_batch()) == [3, 4]
    add(b, clock, 300, 10, start=10)
    clock.advance(0.05)
    assert ids(b.next_batch()) == [10]  # longer than the budget: alone, never stuck
    assert ids(b.next_batch()) == [11]


def test_oldest_ready_bucket_goes_first_and_remove_drops_cancelled_inputs() -> None:
    b, clock = batcher(buckets=(16, 64))
    add(b, clock, 40)
    clock.advance(0.01)
    add(b, clock, 5, 6, start=1)
    assert b.remove(1) and not b.remove(1)
    clock.advance(0.05)
    assert ids(b.next_batch()) == [0]
    assert ids(b.next_batch()) == [2]
    add(b, clock, 5, start=3)
    assert ids(b.next_batch(flush=True)) == [3]


def test_admission_bounds_requests_and_tokens() -> None:
    clock = FakeClock()
    gate = AdmissionController(max_requests=2, max_tokens=100, clock=clock.now)
    a = gate.admit(60)
    with pytest.raises(Overloaded) as exc:
        gate.admit(50)
    assert exc.value.reason == "queue_tokens" and exc.value.retry_after >= 1
    b = gate.admit(40)
    with pytest.raises(Overloaded) as exc:
        gate.admit(1)
    assert exc.value.reason == "queue_requests"
    a.release()
    a.release()  # idempotent
    assert (gate.requests, gate.tokens) == (1, 40)
    b.release()
    with gate.admit(500):  # larger than the budget, but alone: admitted
        assert gate.tokens == 500
    assert gate.requests == 0


def test_retry_after_follows_recent_throughput() -> None:
    clock = FakeClock()
    gate = AdmissionController(max_requests=10, max_tokens=100, clock=clock.now)
    for _ in range(5):
        ticket = gate.admit(100)
        clock.advance(1.0)  # ~100 tokens per busy second (the rate Retry-After drains at)
        ticket.release()
    held = gate.admit(100)
    with pytest.raises(Overloaded) as exc:
        gate.admit(400)
    assert 3 <= exc.value.retry_after <= 6
    held.release()


def test_lru_cache_expires_and_evicts() -> None:
    clock = FakeClock()
    cache = LRUCache(max_entries=2, ttl_s=10, clock=clock.now)

    async def scenario() -> None:
        await cache.set("a", b"1")
        await cache.set("b", b"2")
        assert await cache.get("a") == b"1"  # a is now the most recent
        await cache.set("c", b"3")  # evicts b
        assert await cache.get("b") is None and await cache.get("c") == b"3"
        clock.advance(10)
        assert await cache.get("a") is None and len(cache) == 1

    run(scenario())


def test_cache_key_is_canonical() -> None:
    k1 = cache_key("m", "1", "embeddings", {"a": 1, "b": [1, 2]})
    assert k1 == cache_key("m", "1", "embeddings", {"b": [1, 2], "a": 1})
    assert k1 != cache_key("m", "2", "embeddings", {"a": 1, "b": [1, 2]})


def test_api_keys_are_hashed_and_checked() -> None:
    keys = APIKeys(["s3cret", "other"])
    assert keys.enabled and "s3cret" not in repr(keys.__dict__)
    assert keys.check("Bearer s3cret") and keys.check("bearer other")
    assert not keys.check("Bearer nope") and not keys.check(None) and not keys.check("s3cret")
    assert APIKeys([]).check(None)


def test_config_forbids_typos_names_duplicates_and_hides_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="unknown field 'prot'"):
        load_serve_config(overrides=["prot=1"], named={"models": [{"path": "x"}]})
    with pytest.raises(ConfigError, match="distinct name"):
        load_serve_config(named={"models": [{"path": "a/m"}, {"path": "b/m"}]})
    cfg = ServeConfig(models=[ModelSpec(path="a/m")], api_keys=["k1"])  # type: ignore[list-item]
    assert "k1" not in repr(cfg) and cfg.models[0].served_name == "m"
    monkeypatch.setenv(API_KEYS_ENV, "k2, k3")
    assert cfg.resolved_api_keys() == ["k1", "k2", "k3"]
    cfg = load_serve_config(
        overrides=["embedding.max_wait_ms=5"], named={"models": [{"path": "x"}]}
    )
    assert cfg.embedding.max_wait_ms == 5


def test_command_line_merges_yaml_sets_and_flags(tmp_path: Path) -> None:
    from modelkiln.serve.__main__ import build_parser, config_from_args

    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("models:\n  - path: a/enc\nport: 9000\napi_keys: [from-yaml]\n")
    args = build_parser().parse_args([
        "--config", str(yaml_file), "--set", "embedding.max_wait_ms=10", "--api-key", "flag-key",
        "--cache-url", "redis://127.0.0.1:6390/0", "--host", "0.0.0.0",
    ])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.port, cfg.host, cfg.embedding.max_wait_ms) == (9000, "0.0.0.0", 10)
    assert cfg.cache.url == "redis://127.0.0.1:6390/0"
    assert [k.get_secret_value() for k in cfg.api_keys] == ["from-yaml", "flag-key"]
    argv = ["--model-path", "x/m", "--model-path", "y/e", "--port", "1",
            "--name", "lm", "--name", "enc", "--precision", "fp32"]  # fmt: skip
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    assert [m.served_name for m in cfg.models] == ["lm", "enc"] and cfg.port == 1
    assert cfg.models[0].precision == "fp32" and cfg.models[1].path == Path("y/e")
