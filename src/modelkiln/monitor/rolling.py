"""The handbook's confidence degradation, online: the last N confidences vs the N before them.

The handbook's ``ProductionModelMonitor`` flags a drop of mean confidence of 5 %
between the last 500 predictions and the 500 before them. That compares live
traffic with itself, so it catches a model getting less sure of itself even
when each window still looks like the reference. Here it is one more online
track, ``confidence_rolling`` (test ``confidence_drop``), beside the checks
against the reference:

- the confidence of a request is ``confidence`` (max softmax) for classifiers
  and ``exp(mean_logprob)`` (the geometric mean token probability, in (0, 1])
  for causal LMs; models with neither (encoders) have no rolling track;
- the statistic is the relative drop of the mean, ``(mean(previous) -
  mean(last)) / mean(previous)``, as in :mod:`.stattests.confidence`;
- its threshold is calibrated like every distance test
  (:mod:`.calibration`): the ``1 - alpha`` quantile of that drop between two
  windows of N values drawn from the reference profile's confidences (with
  replacement: a profile is usually smaller than two windows), not a bare 5 %.

Example:
    >>> ref = np.full(100, 0.5) + np.linspace(-0.05, 0.05, 100)
    >>> r = RollingConfidence(ref, "confidence", window=20)
    >>> for _ in range(20): r.add({"confidence": 0.5})
    >>> for _ in range(20): r.add({"confidence": 0.4})
    >>> stat, n = r.current()
    >>> round(stat, 2), n, stat > r.threshold(0.01)
    (0.2, 20, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelkiln.monitor.calibration import simulation_count
from modelkiln.monitor.stattests.confidence import confidence_drop_stat
from modelkiln.monitor.windows import Window

#: The feature name of the rolling track in states, gauges and /v1/monitor.
ROLLING_FEATURE = "confidence_rolling"
ROLLING_TEST = "confidence_drop"
#: Profile features a confidence is read from, in order of preference.
SOURCES = ("confidence", "mean_logprob")


def confidence_source(features: Any) -> str | None:
    """The profile feature the rolling track reads (``None``: the model has none)."""
    return next((name for name in SOURCES if name in features), None)


def as_confidence(source: str, values: Any) -> Any:
    """Confidences from ``source`` values: log-probs become probabilities."""
    return np.exp(values) if source == "mean_logprob" else values


class RollingConfidence:
    """The last ``2 * window`` confidences of one model version, and its calibrated threshold.

    Args:
        reference: the profile's values of ``source`` (for the calibration).
        source: ``confidence`` or ``mean_logprob``.
        window: N, the size of each of the two compared windows.
        seed: seed of the calibration draws.
    """

    def __init__(self, reference: np.ndarray, source: str, window: int, seed: int = 0) -> None:
        self.source = source
        self.window = window
        self.seed = seed
        self.reference = np.asarray(as_confidence(source, reference), dtype=np.float64)
        self.values = Window(2 * window)
        self._thresholds: dict[float, float] = {}

    def add(self, features: dict[str, Any]) -> None:
        """Append the request's confidence, when it has one (log-probs are sampled)."""
        value = features.get(self.source)
        if value is not None:
            self.values.append(float(as_confidence(self.source, float(value))))

    def current(self) -> tuple[float, int] | None:
        """``(relative drop, N)`` of the last N against the N before; None until 2N values."""
        if len(self.values) < self.values.capacity:
            return None
        v = self.values.values()
        stat, _ = confidence_drop_stat(v[: self.window], v[self.window :], "num")
        return float(stat), self.window

    def threshold(self, alpha: float) -> float:
        """The ``1 - alpha`` quantile of the drop between two reference windows of N."""
        if alpha not in self._thresholds:
            self._thresholds[alpha] = max(self._calibrate(alpha), 1e-12)
        return self._thresholds[alpha]

    def _calibrate(self, alpha: float) -> float:
        ref = self.reference[np.isfinite(self.reference)]
        if len(ref) < 2:
            return float("inf")  # nothing to calibrate against: never flag
        rng = np.random.default_rng(self.seed)
        sims = simulation_count(alpha)
        drops = np.empty(sims)
        for start in range(0, sims, 250):  # draws in chunks: bounded memory at large N
            k = min(250, sims - start)
            draws = ref[rng.integers(0, len(ref), (k, 2 * self.window))]
            prev, last = draws[:, : self.window].mean(1), draws[:, self.window :].mean(1)
            drops[start : start + k] = np.where(prev > 0, (prev - last) / prev, 0.0)
        return float(np.quantile(drops, 1.0 - alpha, method="higher"))
