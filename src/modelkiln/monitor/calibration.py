"""Thresholds calibrated to a target false-alarm rate, not a bare p < 0.05 forever.

The budget is ``rate`` false alarms per request with no drift (default 1e-4:
one per 10,000 requests). A check runs every ``every`` requests and tests
``n_tests`` features, so the expected false alarms per request are
``sum(alpha_i) / every``; spending the budget evenly (Bonferroni over
features, a constant alpha-spending rate over time) gives each test of each
check ``alpha = rate * every / n_tests``. Consecutive windows overlap, so
false alarms cluster and alert dedup turns a cluster into one alert: the real
rate is at or below the budget.

- Tests with p-values (KS, chi-squared, Welch t, MMD) use ``p < alpha`` as is:
  their p-values are valid under no drift (MMD's permutation count is raised
  to at least ``10 / alpha`` so that small alphas are reachable).
- Distance tests (PSI, Wasserstein, Jensen-Shannon, confidence drop) have no
  p-value: their threshold is the ``1 - alpha`` quantile of the distance
  between the reference and windows of the online size drawn from it
  (disjoint splits when the reference holds two windows, else bootstrap),
  seeded, computed once per feature in the monitor's background thread.

Example:
    >>> per_test_alpha(1e-4, every=250, n_tests=5)
    0.005
"""

from __future__ import annotations

import math

import numpy as np

from modelkiln.monitor.stattests import StatTest

#: Never spend more than this per test, whatever the budget says.
MAX_ALPHA = 0.05


def per_test_alpha(rate: float, *, every: int, n_tests: int) -> float:
    """The alpha of one test in one check for ``rate`` false alarms per request."""
    return min(MAX_ALPHA, rate * every / max(n_tests, 1))


def simulation_count(alpha: float, cap: int = 2000) -> int:
    """Simulated windows for a ``1 - alpha`` quantile (about 10 beyond it; at most ``cap``,
    where the threshold is the near-maximum of the simulated null distances)."""
    return min(cap, max(200, math.ceil(10.0 / alpha)))


def calibrate_distance(
    test: StatTest,
    reference: np.ndarray,
    feature_type: str,
    *,
    window: int,
    alpha: float,
    seed: int = 0,
) -> float:
    """The ``1 - alpha`` quantile of ``test`` between ``reference`` and null windows."""
    rng = np.random.default_rng(seed)
    n = len(reference)
    disjoint = n >= 2 * window
    scores = np.empty(simulation_count(alpha))
    for i in range(len(scores)):
        if disjoint:
            idx = rng.permutation(n)
            ref, cur = reference[idx[window:]], reference[idx[:window]]
        else:
            ref = reference[rng.integers(0, n, n)]
            cur = reference[rng.integers(0, n, window)]
        scores[i] = test.func(ref, cur, feature_type)[0]
    return float(np.quantile(scores, 1.0 - alpha, method="higher"))
