"""Fault injection for tests and benchmarks: a candidate that errors N %, is X ms slower,
or answers differently. Pure: a draw says what to do to one request; the simulator
(:mod:`.simulate`) or a test server's wrapper applies it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field

from modelkiln.configbase import KilnModel


class FaultSpec(KilnModel):
    """What goes wrong with a version, from ``after_s`` seconds on."""

    error_rate: float = Field(default=0.0, ge=0, le=1, description="Share of requests that fail.")
    extra_latency_ms: float = Field(default=0.0, ge=0, description="Added to every request.")
    disagree_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of answers that differ from the baseline's."
    )
    after_s: float = Field(default=0.0, ge=0, description="Seconds after the start it begins.")


@dataclass(frozen=True)
class FaultDraw:
    """What to do to one request."""

    fail: bool = False
    delay_ms: float = 0.0
    disagree: bool = False


class FaultInjector:
    """Draws faults for one version from a seeded generator."""

    def __init__(self, spec: FaultSpec, seed: int = 0) -> None:
        self.spec = spec
        self.rng = random.Random(seed)

    def draw(self, elapsed_s: float) -> FaultDraw:
        """The fault for one request ``elapsed_s`` seconds after the start."""
        s = self.spec
        if elapsed_s < s.after_s:
            return FaultDraw()
        return FaultDraw(
            fail=self.rng.random() < s.error_rate,
            delay_ms=s.extra_latency_ms,
            disagree=self.rng.random() < s.disagree_rate,
        )
