"""Normed Wasserstein (earth mover's) distance.

Name: ``wasserstein``. Numeric features. The distance divided by the
reference's standard deviation, so the threshold (default 0.1, Evidently's) is
in units of sigma: 0.1 means the mass moved a tenth of a standard deviation
on average. The registry's default above 1,000 values, where KS flags
negligible differences.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> round(wasserstein_test.run(rng.normal(size=5000), rng.normal(0.5, 1, 5000)).statistic, 1)
    0.5
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests.base import StatTest, register_stattest


def wasserstein_stat(
    reference: np.ndarray, current: np.ndarray, feature_type: str
) -> tuple[float, None]:
    """W1(reference, current) / std(reference) (std 1 when the reference is constant)."""
    from scipy.stats import wasserstein_distance

    std = float(np.std(reference)) or 1.0
    return float(wasserstein_distance(reference, current)) / std, None


wasserstein_test = register_stattest(
    StatTest(
        name="wasserstein",
        display_name="Wasserstein distance (normed)",
        func=wasserstein_stat,
        feature_types=("num",),
        default_threshold=0.1,
        threshold_kind="distance",
    )
)
