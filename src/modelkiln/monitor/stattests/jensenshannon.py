"""Jensen-Shannon distance between binned distributions.

Name: ``jensenshannon``. Numeric or categorical features, binned as for PSI
(reference quantiles with open outer bins, or one bin per value). The distance
(base 2, so in [0, 1]) is symmetric and bounded, unlike PSI. Drift when it is
>= the threshold (default 0.1, Evidently's).

Example:
    >>> jensenshannon_test.run(list("ab" * 100), list("b" * 200), "cat").drifted
    True
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests._binning import proportions
from modelkiln.monitor.stattests.base import StatTest, register_stattest


def js_stat(reference: np.ndarray, current: np.ndarray, feature_type: str) -> tuple[float, None]:
    """The Jensen-Shannon distance (base 2) of the two binned distributions."""
    from scipy.spatial.distance import jensenshannon

    r, c = proportions(reference, current, feature_type)
    return float(jensenshannon(r, c, base=2)), None


jensenshannon_test = register_stattest(
    StatTest(
        name="jensenshannon",
        display_name="Jensen-Shannon distance",
        func=js_stat,
        feature_types=("num", "cat"),
        default_threshold=0.1,
        threshold_kind="distance",
    )
)
