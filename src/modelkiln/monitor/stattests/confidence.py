"""Confidence degradation: the handbook's ``ProductionModelMonitor`` check, fixed.

Name: ``confidence_drop``. Numeric confidences (max softmax, mean token
probability). The statistic is the relative drop of the mean,
``(mean(reference) - mean(current)) / mean(reference)``; drift when it is >=
the threshold (default 0.05, the handbook's 5 %). Online, ``reference`` is
the previous window and ``current`` the last one (500 and 500 in the
handbook); :func:`confidence_degradation` does that split.

Example:
    >>> confidence_degradation([0.9] * 500 + [0.8] * 500).drifted
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelkiln.monitor.stattests.base import StatResult, StatTest, register_stattest


def confidence_drop_stat(
    reference: np.ndarray, current: np.ndarray, feature_type: str
) -> tuple[float, None]:
    """The relative drop of mean confidence (negative when confidence rose)."""
    ref_mean = float(np.mean(reference))
    if ref_mean <= 0:
        return 0.0, None
    return (ref_mean - float(np.mean(current))) / ref_mean, None


confidence_drop_test = register_stattest(
    StatTest(
        name="confidence_drop",
        display_name="Confidence degradation (relative drop)",
        func=confidence_drop_stat,
        feature_types=("num",),
        default_threshold=0.05,
        threshold_kind="distance",
    )
)


def confidence_degradation(
    confidences: Sequence[float] | np.ndarray, window: int = 500, threshold: float = 0.05
) -> StatResult | None:
    """Last ``window`` confidences against the ``window`` before them; ``None`` if too few."""
    arr = np.asarray(confidences, dtype=np.float64)
    if len(arr) < 2 * window:
        return None
    return confidence_drop_test.run(arr[-2 * window : -window], arr[-window:], "num", threshold)
