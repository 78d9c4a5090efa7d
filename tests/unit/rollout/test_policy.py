"""Traffic policies: split, sticky keys, override, shadow, ramp config."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from modelkiln.errors import ConfigError
from modelkiln.rollout.policy import CanaryConfig, assign, make_policy, single, split


def test_weights_must_sum_to_100() -> None:
    with pytest.raises(ConfigError, match="sum to 90"):
        make_policy(weights={"1": 60, "2": 30})
    with pytest.raises(ConfigError, match="must be >= 0"):
        make_policy(weights={"1": 110, "2": -10})
    assert sum(split("1", "2", 25).weights.values()) == 100


def test_weighted_split_follows_the_weights() -> None:
    rng = random.Random(0)
    policy = make_policy(weights={"1": 70, "2": 20, "3": 10})
    counts = Counter(assign(policy, rng=rng).version for _ in range(20_000))
    assert counts["1"] / 20_000 == pytest.approx(0.70, abs=0.02)
    assert counts["3"] / 20_000 == pytest.approx(0.10, abs=0.01)


def test_sticky_keys_only_move_to_the_candidate() -> None:
    users = [f"user-{i}" for i in range(2000)]
    on_cand: set[str] = set()
    for pct in (5, 25, 50, 100):
        policy = split("1", "2", pct)
        now = {u for u in users if assign(policy, key=u).version == "2"}
        assert on_cand <= now  # nobody goes back to the baseline as the weight grows
        assert len(now) / len(users) == pytest.approx(pct / 100, abs=0.04)
        on_cand = now
    again = split("1", "2", 25)
    assert all(assign(again, key=u) == assign(again, key=u) for u in users[:50])


def test_override_header() -> None:
    policy = split("1", "2", 5)
    assert assign(policy, override="2").version == "2"
    assert assign(policy, override="2").reason == "override"
    with pytest.raises(ConfigError, match="'9' is not a served version"):
        assign(policy, override="9")
    closed = make_policy(weights={"1": 100}, allow_override=False)
    assert assign(closed, override="2").version == "1"


def test_shadow_share() -> None:
    rng = random.Random(1)
    policy = make_policy(weights={"1": 100}, shadow="2", shadow_percent=20)
    draws = [assign(policy, rng=rng) for _ in range(10_000)]
    assert {d.version for d in draws} == {"1"}
    assert sum(d.shadow == "2" for d in draws) / 10_000 == pytest.approx(0.2, abs=0.02)
    assert assign(single("1"), rng=rng).shadow is None


def test_canary_defaults_and_bad_steps() -> None:
    cfg = CanaryConfig()
    assert (cfg.steps, cfg.dwell_s, cfg.check_interval_s, cfg.window) == (
        [5, 25, 50, 100], 600.0, 30.0, 5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="end at 100"):
        CanaryConfig(steps=[5, 50])
    with pytest.raises(ValueError, match="rise strictly"):
        CanaryConfig(steps=[50, 25, 100])
