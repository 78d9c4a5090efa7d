"""Kolmogorov-Smirnov two-sample test.

Name: ``ks``. Numeric features. Drift when the p-value is below the threshold
(default 0.05). Sensitive to any difference in shape; with large samples it
flags differences too small to matter, so the registry prefers Wasserstein
above 1,000 values (Evidently's rule).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ks_test.run(rng.normal(size=300), rng.normal(size=300)).drifted
    False
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests.base import StatTest, register_stattest


def ks_stat(reference: np.ndarray, current: np.ndarray, feature_type: str) -> tuple[float, float]:
    """The KS statistic and its two-sided p-value."""
    from scipy.stats import ks_2samp

    res = ks_2samp(reference, current)
    return float(res.statistic), float(res.pvalue)


ks_test = register_stattest(
    StatTest(
        name="ks",
        display_name="Kolmogorov-Smirnov p-value",
        func=ks_stat,
        feature_types=("num",),
        default_threshold=0.05,
        threshold_kind="p_value",
    )
)
