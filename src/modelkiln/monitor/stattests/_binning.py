"""Shared binning for histogram tests (PSI, Jensen-Shannon).

The handbook's PSI used ``np.histogram`` on reference edges and so dropped every
current value outside the reference range (§19); here the outer edges are
``-inf`` / ``+inf`` so such values land in the outer bins and count. Discrete
numeric data (few distinct values) and categories are binned by value, with a
bin for values the reference never had.
"""

from __future__ import annotations

import numpy as np

#: Proportion used for empty bins so ``log`` stays finite (Evidently's 1e-4 too).
EPS = 1e-4


def proportions(
    reference: np.ndarray, current: np.ndarray, feature_type: str, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Bin both samples on the reference's bins and return the two proportion vectors."""
    if feature_type == "cat" or len(np.unique(reference)) <= n_bins:
        ref_c, cur_c = _by_value(reference, current)
    else:
        inner = np.unique(np.quantile(reference, np.linspace(0, 1, n_bins + 1))[1:-1])
        edges = np.concatenate(([-np.inf], inner, [np.inf]))
        # right-closed bins; searchsorted keeps out-of-range values in the outer bins
        ref_c = np.bincount(np.searchsorted(edges, reference, "left") - 1, minlength=len(edges) - 1)
        cur_c = np.bincount(np.searchsorted(edges, current, "left") - 1, minlength=len(edges) - 1)
        ref_c, cur_c = ref_c[: len(edges) - 1], cur_c[: len(edges) - 1]
    return _smooth(ref_c), _smooth(cur_c)


def _by_value(reference: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.union1d(np.unique(reference), np.unique(current))
    ref_c = np.bincount(np.searchsorted(values, reference), minlength=len(values))
    cur_c = np.bincount(np.searchsorted(values, current), minlength=len(values))
    return ref_c, cur_c


def _smooth(counts: np.ndarray) -> np.ndarray:
    p = counts / max(counts.sum(), 1)
    p = np.where(p == 0, EPS, p)
    return p / p.sum()
