"""Monitoring: drift tests, reference profiles, the online monitor, alerts and exports.

Nothing heavy is imported here (scipy loads inside the tests that need it).

Example:
    >>> from modelkiln.monitor.stattests import get_stattest
    >>> get_stattest("psi").default_threshold
    0.2
"""

from __future__ import annotations
