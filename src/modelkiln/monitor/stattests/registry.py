"""Look up drift tests by name and pick a default from feature type and sample size.

Defaults follow Evidently's rule of thumb: up to 1,000 values, tests with
p-values (KS for numbers, chi-squared for categories); above that, distances
with a meaningful size (normed Wasserstein, Jensen-Shannon), because a p-value
on 10,000 values flags differences nobody cares about. Embeddings: MMD.

Example:
    >>> default_stattest("num", 5000).name
    'wasserstein'
"""

from __future__ import annotations

from modelkiln.errors import ConfigError
from modelkiln.monitor.stattests.base import FEATURE_TYPES, StatTest, registered

#: Sample size above which the default switches from a p-value to a distance.
LARGE_SAMPLE = 1000


def get_stattest(name: str) -> StatTest:
    """The registered test called ``name``.

    Raises:
        ConfigError: no such test (the message lists the known ones).
    """
    tests = registered()
    if name not in tests:
        raise ConfigError(
            f"unknown drift test '{name}'",
            hint=f"use one of: {', '.join(sorted(tests))}",
        )
    return tests[name]


def default_stattest(feature_type: str, n: int) -> StatTest:
    """The default test for a feature of ``feature_type`` with ``n`` reference values."""
    if feature_type not in FEATURE_TYPES:
        raise ConfigError(
            f"unknown feature type '{feature_type}'", hint=f"use one of {', '.join(FEATURE_TYPES)}"
        )
    if feature_type == "emb":
        return get_stattest("mmd")
    if feature_type == "cat":
        return get_stattest("chisquare" if n <= LARGE_SAMPLE else "jensenshannon")
    return get_stattest("ks" if n <= LARGE_SAMPLE else "wasserstein")
