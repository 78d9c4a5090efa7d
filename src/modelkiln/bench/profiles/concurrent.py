"""Closed loop: ``concurrency`` clients, each sends its next request when the last ended.

Measures capacity at a fixed concurrency; it cannot show queueing in front of the
server (the clients wait instead), so its latencies are service times only.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelkiln.errors import ConfigError


@dataclass(frozen=True)
class ClosedLoop:
    """N clients back to back."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}", hint="e.g. 8")

    @property
    def mode(self) -> str:
        """How the run is described in reports."""
        return f"closed loop, concurrency {self.concurrency}"
