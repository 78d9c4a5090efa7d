"""Drift tests: one file per test, each a pure function + a registered ``StatTest``.

Importing this package registers every test; look them up with
:func:`get_stattest` or let :func:`default_stattest` choose.

Example:
    >>> sorted(registered())[:3]
    ['chisquare', 'confidence_drop', 'jensenshannon']
"""

from __future__ import annotations

from modelkiln.monitor.stattests import (  # noqa: F401  (importing registers the tests)
    chisquare,
    confidence,
    jensenshannon,
    ks,
    mmd,
    psi,
    ttest,
    wasserstein,
)
from modelkiln.monitor.stattests.base import (
    FEATURE_TYPES,
    FeatureType,
    StatResult,
    StatTest,
    register_stattest,
    registered,
)
from modelkiln.monitor.stattests.confidence import confidence_degradation
from modelkiln.monitor.stattests.registry import default_stattest, get_stattest

__all__ = [
    "FEATURE_TYPES",
    "FeatureType",
    "StatResult",
    "StatTest",
    "confidence_degradation",
    "default_stattest",
    "get_stattest",
    "register_stattest",
    "registered",
]
