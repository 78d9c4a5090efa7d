"""Open loop: requests arrive at ``rate`` per second whatever the server does.

Arrivals: ``constant`` (evenly spaced), ``poisson`` (exponential gaps) or ``gamma``
(gamma gaps of shape ``burstiness``: below 1 burstier than Poisson, above 1 more
regular, 1 is Poisson — vLLM's ``--burstiness``). Seeded, so two runs send at the
same offsets.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from modelkiln.errors import ConfigError

Arrival = Literal["constant", "poisson", "gamma"]
ARRIVALS: tuple[str, ...] = ("constant", "poisson", "gamma")


@dataclass(frozen=True)
class OpenLoop:
    """Requests at ``rate`` per second with the given arrival process."""

    rate: float
    arrival: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError(f"rate must be > 0 requests/s, got {self.rate}", hint="e.g. 2.0")
        if self.arrival not in ARRIVALS:
            raise ConfigError(
                f"unknown arrival process {self.arrival!r}", hint=f"one of {', '.join(ARRIVALS)}"
            )
        if self.burstiness <= 0:
            raise ConfigError(f"burstiness must be > 0, got {self.burstiness}", hint="e.g. 1.0")

    @property
    def mode(self) -> str:
        """How the run is described in reports."""
        if self.arrival == "poisson":
            return f"open loop, Poisson {self.rate:g} req/s"
        if self.arrival == "gamma":
            return f"open loop, gamma (burstiness {self.burstiness:g}) {self.rate:g} req/s"
        return f"open loop, constant {self.rate:g} req/s"

    def offsets(self) -> Iterator[float]:
        """Send offsets in seconds from the run's start (endless)."""
        return arrival_offsets(self.rate, self.arrival, self.burstiness, self.seed)


def arrival_offsets(
    rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> Iterator[float]:
    """Endless send offsets (seconds) of an arrival process at ``rate`` per second."""
    rng = random.Random(seed)
    t = 0.0
    i = 0
    while True:
        if arrival == "constant":
            i += 1
            yield i / rate
            continue
        if arrival == "poisson":
            t += rng.expovariate(rate)
        else:  # gamma with mean gap 1/rate
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        yield t
