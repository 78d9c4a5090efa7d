"""What the monitor keeps per served model version: feature windows and service statistics.

Request rate, error rate and latency percentiles come from small fixed windows
of the last ``SERVICE_WINDOW`` requests, for the dashboard and alert rules.
Every check's verdict per feature is a :class:`FeatureState`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelkiln.monitor.rolling import ROLLING_FEATURE, RollingConfidence
from modelkiln.monitor.windows import Window

SERVICE_WINDOW = 1000
#: The code of a category the reference never had (all such categories count as one).
UNSEEN = -1


def category_codes(reference: np.ndarray) -> tuple[dict[str, int], np.ndarray]:
    """Codes of a categorical reference's categories, and the reference as codes."""
    cats = np.unique(reference.astype(str))
    codes = {str(c): i for i, c in enumerate(cats)}
    return codes, np.searchsorted(cats, reference.astype(str)).astype(np.float64)


@dataclass
class FeatureState:
    """The last judgement of one feature of one model version."""

    model: str
    version: str
    feature: str
    group: str
    test: str
    statistic: float
    p_value: float | None
    threshold: float
    threshold_kind: str
    score: float  # 1.0 at the calibrated threshold, above it means drift
    drifted: bool
    n_current: int
    checked_at: float


class ModelTrack:
    """Windows of one (model, version)."""

    def __init__(
        self,
        model: str,
        version: str,
        kinds: dict[str, str],
        config: Any,
        rolling: RollingConfidence | None = None,
        codes: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.model, self.version = model, version
        self.rolling = rolling  # the live-vs-live confidence track (None: no confidences)
        # categorical features: category -> code (windows hold numbers; unseen ones are -1)
        self.codes = codes or {}
        self.config = config
        self.kinds = kinds
        self.windows: dict[str, Window] = {
            f: Window(config.embedding_window if k == "emb" else config.window)
            for f, k in kinds.items()
        }
        self.requests = 0
        self.observed = 0  # requests whose features were read (no failures)
        self.errors = 0
        self.since_check = 0
        self.last_check = 0.0
        self._lock = threading.Lock()
        self.latency = Window(SERVICE_WINDOW)
        self.ends = Window(SERVICE_WINDOW)
        self.failed = Window(SERVICE_WINDOW)

    def count(self, record: Any, now: float) -> None:
        """Count one finished request in the service statistics."""
        status = int(getattr(record, "status", 200))
        with self._lock:
            self.requests += 1
            self.since_check += 1
            self.errors += status >= 500
        self.latency.append(float(getattr(record, "latency_s", 0.0)))
        self.ends.append(float(getattr(record, "time", now)))
        self.failed.append(1.0 if status >= 500 else 0.0)

    def add(self, features: dict[str, Any]) -> None:
        """Append one request's features to the windows the profile has."""
        for name, value in features.items():
            w = self.windows.get(name)
            if w is not None:
                codes = self.codes.get(name)
                w.append(value if codes is None else float(codes.get(str(value), UNSEEN)))
        if self.rolling is not None:
            self.rolling.add(features)

    def window_sizes(self) -> dict[str, int]:
        """Values each window holds now."""
        sizes = {f: len(w) for f, w in self.windows.items()}
        if self.rolling is not None:
            sizes[ROLLING_FEATURE] = len(self.rolling.values)
        return sizes

    def window_fill(self) -> dict[str, float]:
        """Values each window received per observed request (log-probs: the sample rate)."""
        n = max(self.observed, 1)
        fill = {f: round(w.total / n, 4) for f, w in self.windows.items()}
        if self.rolling is not None:
            fill[ROLLING_FEATURE] = round(self.rolling.values.total / n, 4)
        return fill

    def due(self, now: float) -> bool:
        """Whether enough requests or time passed since the last check."""
        if self.since_check >= self.config.check_every_requests:
            return True
        # on time, only with enough new requests: re-testing one window spends alpha for nothing
        floor = max(1, self.config.check_every_requests // 10)
        late = now - self.last_check >= self.config.check_every_seconds
        return late and self.since_check >= floor

    def take_since_check(self, now: float) -> int:
        """New requests since the last check, resetting the count."""
        with self._lock:
            n, self.since_check, self.last_check = self.since_check, 0, now
        return n

    def service_stats(self, now: float) -> dict[str, Any]:
        """Requests, rate, error rate and latency percentiles over the last requests."""
        lat, ends, failed = self.latency.values(), self.ends.values(), self.failed.values()
        span = float(now - ends.min()) if len(ends) else 0.0
        pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [None] * 3
        return {
            "requests": self.requests,
            "errors": self.errors,
            "request_rate_per_s": float(len(ends) / span) if span > 0 else 0.0,
            "error_rate": float(failed.mean()) if len(failed) else 0.0,
            "latency_p50_s": None if pct[0] is None else float(pct[0]),
            "latency_p95_s": None if pct[1] is None else float(pct[1]),
            "latency_p99_s": None if pct[2] is None else float(pct[2]),
        }
