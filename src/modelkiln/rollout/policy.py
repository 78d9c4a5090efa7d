"""Traffic policies (*what* to do), pure: weighted split, sticky keys, override, shadow, ramp.

A :class:`TrafficPolicy` is immutable; the router swaps the whole object in one
assignment, so a blue-green switch or a ramp step is atomic: a request sees the
old policy or the new one, never a mix. A request keeps the version it was
assigned for its whole life (streams included), so in-flight work finishes on
the version it started on.

Sticky assignment hashes the key into 10,000 buckets; the candidate owns the
lowest buckets, so as its weight grows users only move *to* it, never back and
forth between steps.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError

BUCKETS = 10_000
OVERRIDE_HEADER = "X-Model-Version"


class CanaryConfig(KilnModel):
    """The canary ramp and its absolute SLO thresholds (handbook defaults)."""

    steps: list[int] = Field(
        default=[5, 25, 50, 100], description="Candidate traffic percent per stage, ending at 100."
    )
    dwell_s: float = Field(default=600.0, gt=0, description="Seconds per stage (10 min).")
    check_interval_s: float = Field(default=30.0, gt=0, description="Seconds between checks.")
    window: int = Field(default=5, ge=1, description="Checks averaged by the absolute gates.")
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Candidate error rate above this (windowed) fails."
    )
    max_latency_ms: float = Field(
        default=2000.0, gt=0, description="Candidate p95 latency above this (windowed) fails."
    )
    min_requests: int = Field(
        default=20, ge=0, description="Candidate requests a stage needs before it may advance."
    )
    mirror_percent: float = Field(
        default=100.0,
        ge=0,
        le=100,
        description="Share of requests also run on the other version at the same time, answer "
        "discarded, so both versions are measured on the same requests (a 5 % canary then "
        "sees as many requests as the baseline). Costs that much extra compute; 0: only "
        "served traffic is analysed.",
    )
    analysis_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between updates of the sequential tests; a test that crosses its "
        "bound rolls back at once, without waiting for the next check.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or v[-1] != 100 or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"steps {v} must rise strictly and end at 100")
        if any(not 0 < s <= 100 for s in v):
            raise ValueError(f"steps {v} must be percents in (0, 100]")
        return v


class TrafficPolicy(KilnModel):
    """How one model's requests are spread over its versions."""

    weights: dict[str, int] = Field(description="Version label -> percent of traffic; sums to 100.")
    candidate: str | None = Field(
        default=None, description="The version that owns the lowest sticky buckets."
    )
    shadow: str | None = Field(default=None, description="Version that gets mirrored traffic.")
    shadow_percent: float = Field(default=0.0, ge=0, le=100, description="Share mirrored.")
    allow_override: bool = Field(default=True, description=f"Honour the {OVERRIDE_HEADER} header.")
    mirror_percent: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="Share of requests of a two-version split also run on the other version.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrafficPolicy:
        total = sum(self.weights.values())
        if total != 100 or any(w < 0 for w in self.weights.values()):
            raise ValueError(
                f"weights {self.weights} sum to {total}; they must be >= 0 and sum to 100"
            )
        if self.candidate is not None and self.candidate not in self.weights:
            raise ValueError(f"candidate {self.candidate!r} is not one of {list(self.weights)}")
        return self


def make_policy(**kwargs: object) -> TrafficPolicy:
    """Build a policy; a bad split raises ConfigError naming the weights."""
    from pydantic import ValidationError

    try:
        return TrafficPolicy.model_validate(kwargs)
    except ValidationError as exc:
        raise ConfigError(
            f"bad traffic policy: {exc.errors()[0]['msg']}",
            hint="give every version a percent; the percents must add up to exactly 100",
        ) from None


def split(baseline: str, candidate: str, percent: int, **kw: object) -> TrafficPolicy:
    """A two-version policy: ``percent`` % to the candidate, the rest to the baseline."""
    weights = {baseline: 100 - percent, candidate: percent} if candidate != baseline else {}
    return make_policy(weights=weights or {baseline: 100}, candidate=candidate, **kw)


def single(version: str) -> TrafficPolicy:
    """All traffic to one version (blue-green after the switch, or no rollout)."""
    return make_policy(weights={version: 100})


def bucket(key: str) -> int:
    """Stable bucket in [0, BUCKETS) of a user key (sha256: same on every process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Assignment:
    """Where one request goes: the serving version, and a version to mirror it to (or None)."""

    version: str
    shadow: str | None = None
    reason: str = "split"


def assign(
    policy: TrafficPolicy,
    *,
    key: str | None = None,
    override: str | None = None,
    rng: random.Random | None = None,
) -> Assignment:
    """Pick the version for one request.

    Args:
        policy: the model's current policy.
        key: a user key or header value for sticky assignment (None: random).
        override: the ``X-Model-Version`` header value, if any.
        rng: random source (tests pass a seeded one).

    Raises:
        ConfigError: the override names a version this policy does not serve.
    """
    rng = rng or random.Random()
    if override is not None and policy.allow_override:
        if override not in policy.weights and override != policy.shadow:
            raise ConfigError(
                f"{OVERRIDE_HEADER}: {override!r} is not a served version",
                hint=f"use one of {sorted(policy.weights)}",
            )
        return Assignment(override, None, "override")
    b = bucket(key) if key is not None else rng.randrange(BUCKETS)
    version = _pick(policy, b)
    shadow, percent = policy.shadow, policy.shadow_percent
    if shadow is None and policy.mirror_percent > 0 and len(policy.weights) == 2:
        # Analysis mirror of a canary: the twin runs on the version *not* serving it.
        shadow, percent = next(v for v in policy.weights if v != version), policy.mirror_percent
    if shadow == version or percent <= 0:
        shadow = None
    if shadow is not None:
        # Mirroring is drawn apart from the split so the shadow sample is not biased.
        s = bucket("shadow:" + key) if key is not None else rng.randrange(BUCKETS)
        if s >= percent * BUCKETS / 100:
            shadow = None
    return Assignment(version, shadow, "sticky" if key is not None else "split")


def _pick(policy: TrafficPolicy, b: int) -> str:
    order = sorted(policy.weights, key=lambda v: (v != policy.candidate, v))
    edge = 0.0
    for v in order:
        edge += policy.weights[v] * BUCKETS / 100
        if b < edge:
            return v
    return order[-1]
