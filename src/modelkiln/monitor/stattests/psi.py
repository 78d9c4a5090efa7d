"""Population Stability Index.

Name: ``psi``. Numeric or categorical features. ``sum((c - r) * ln(c / r))``
over 10 reference-quantile bins (or one bin per value for discrete data).
Drift when PSI >= 0.2 (the handbook's bands: < 0.1 stable, 0.1-0.2 moderate,
>= 0.2 significant). Values outside the reference range count in the outer
bins, and categories the reference never had get a bin of their own.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> psi_test.run(rng.normal(size=1000), rng.normal(1, 1, 1000)).drifted
    True
"""

from __future__ import annotations

import numpy as np

from modelkiln.monitor.stattests._binning import proportions
from modelkiln.monitor.stattests.base import StatTest, register_stattest


def psi_stat(reference: np.ndarray, current: np.ndarray, feature_type: str) -> tuple[float, None]:
    """The PSI over the reference's bins (no p-value: it is a distance)."""
    r, c = proportions(reference, current, feature_type)
    return float(np.sum((c - r) * np.log(c / r))), None


psi_test = register_stattest(
    StatTest(
        name="psi",
        display_name="Population Stability Index",
        func=psi_stat,
        feature_types=("num", "cat"),
        default_threshold=0.2,
        threshold_kind="distance",
    )
)
