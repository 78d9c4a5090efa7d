"""Chi-squared test of homogeneity on category counts.

Name: ``chisquare``. Categorical features (cast discrete numbers to ``cat``). The two
samples' counts form a 2 x k contingency table over the union of categories,
so a category seen only in the current window counts too. Drift when the
p-value is below the threshold (default 0.05).

Example:
    >>> chisquare_test.run(list("aabbc" * 40), list("aaaaa" * 40), "cat").drifted
    True
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests.base import StatTest, register_stattest


def chisquare_stat(
    reference: np.ndarray, current: np.ndarray, feature_type: str
) -> tuple[float, float]:
    """The chi-squared statistic and p-value of the 2 x k table."""
    from scipy.stats import chi2_contingency

    values = np.union1d(np.unique(reference), np.unique(current))
    if len(values) < 2:
        return 0.0, 1.0  # one category on both sides: nothing can differ
    table = np.stack(
        [
            np.bincount(np.searchsorted(values, reference), minlength=len(values)),
            np.bincount(np.searchsorted(values, current), minlength=len(values)),
        ]
    )
    res = chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue)


chisquare_test = register_stattest(
    StatTest(
        name="chisquare",
        display_name="Chi-squared p-value",
        func=chisquare_stat,
        feature_types=("cat",),
        default_threshold=0.05,
        threshold_kind="p_value",
    )
)
