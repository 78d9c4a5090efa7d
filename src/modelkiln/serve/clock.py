"""Clocks for the schedulers: the real monotonic one and a fake one for tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of time in seconds (monotonic)."""

    def now(self) -> float:
        """The current time."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        """The current time."""
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self.time = start

    def now(self) -> float:
        """The current (fake) time."""
        return self.time

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.time += seconds
