"""Welch's t-test on the means.

Name: ``t_test``. Numeric features. The handbook's ``ProductionModelMonitor``
compared input means with a t-test; Welch's version does not assume equal
variances. Sees mean shifts only: a variance shift with the same mean passes.
Drift when the p-value is below the threshold (default 0.05).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t_test.run(rng.normal(size=500), rng.normal(0.5, 1, 500)).drifted
    True
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests.base import StatTest, register_stattest


def t_stat(reference: np.ndarray, current: np.ndarray, feature_type: str) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value (p = 1 when both samples are constant)."""
    from scipy.stats import ttest_ind

    if np.ptp(reference) == 0 and np.ptp(current) == 0:
        return (0.0, 1.0) if reference[0] == current[0] else (np.inf, 0.0)
    res = ttest_ind(reference, current, equal_var=False)
    return float(res.statistic), float(res.pvalue)


t_test = register_stattest(
    StatTest(
        name="t_test",
        display_name="Welch t-test p-value",
        func=t_stat,
        feature_types=("num",),
        default_threshold=0.05,
        threshold_kind="p_value",
    )
)
