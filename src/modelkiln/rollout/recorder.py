"""An in-memory metrics source: the router records each request, the controller drains
one check interval at a time. Thread-safe (requests finish on many threads)."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Protocol

from modelkiln.rollout.analysis import ArmWindow


class MetricsSource(Protocol):
    """What the controller reads at each check."""

    def drain(self, model: str, version: str) -> ArmWindow:
        """What ``model@version`` did since the last drain (and forget it)."""
        ...

    def drain_pairs(self, model: str) -> list[float]:
        """Agreement scores of shadow pairs since the last drain (and forget them)."""
        ...


class Recorder:
    """The default :class:`MetricsSource`, fed by the router or a simulator."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arms: dict[tuple[str, str], ArmWindow] = defaultdict(ArmWindow)
        self._pairs: dict[str, list[float]] = defaultdict(list)

    def record(
        self,
        model: str,
        version: str,
        *,
        ok: bool,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
        tpot_ms: float | None = None,
    ) -> None:
        """One finished request of ``model@version``."""
        with self._lock:
            arm = self._arms[(model, version)]
            arm.requests += 1
            arm.errors += not ok
            if ok and latency_ms is not None:
                arm.latency_ms.append(latency_ms)
            if ok and ttft_ms is not None:
                arm.ttft_ms.append(ttft_ms)
            if ok and tpot_ms is not None:
                arm.tpot_ms.append(tpot_ms)

    def record_pair(self, model: str, agreement: float) -> None:
        """Agreement (0..1) of a shadow answer with the served one."""
        with self._lock:
            self._pairs[model].append(agreement)

    def drain(self, model: str, version: str) -> ArmWindow:
        """What ``model@version`` did since the last drain."""
        with self._lock:
            return self._arms.pop((model, version), ArmWindow())

    def drain_pairs(self, model: str) -> list[float]:
        """Shadow-pair agreement scores since the last drain."""
        with self._lock:
            return self._pairs.pop(model, [])
