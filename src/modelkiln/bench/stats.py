"""Bootstrap confidence intervals (numpy; seeded so a report is reproducible), and the
single-server FIFO queue that open-loop response times are checked against.

Hand-written rather than ``scipy.stats.bootstrap``: scipy is an optional extra
and the two statistics needed here (a percentile, a ratio of medians) take a
few lines of vectorised numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bootstrap_percentile_ci", "bootstrap_ratio_ci", "fifo_response_times"]


def bootstrap_percentile_ci(
    values: Sequence[float], q: float, *, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float] | None:
    """(low, high) of the ``q``-th percentile's ``1 - alpha`` interval; None for no values."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(n, x.size))]
    stats = np.percentile(draws, q, axis=1)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ratio_ci(
    a: Sequence[float], b: Sequence[float], *, n: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio, low, high): median(b) / median(a) and its ``1 - alpha`` bootstrap interval.

    A single value per side (a plain summary, no samples) gives a zero-width interval.
    """
    import numpy as np

    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("both sides need at least one value")
    ratio = float(np.median(xb) / np.median(xa))
    rng = np.random.default_rng(seed)
    ma = np.median(xa[rng.integers(0, xa.size, size=(n, xa.size))], axis=1)
    mb = np.median(xb[rng.integers(0, xb.size, size=(n, xb.size))], axis=1)
    lo, hi = np.percentile(mb / ma, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return ratio, float(lo), float(hi)


def fifo_response_times(scheduled: Sequence[float], service: Sequence[float]) -> list[float]:
    """Response times of a one-server FIFO queue fed these arrivals (Lindley's recursion).

    ``scheduled[i]`` is when request i arrives, ``service[i]`` how long it holds the
    server; the result is in arrival order. What an open-loop run against a
    one-worker server must report as its response time (coordinated-omission check).
    """
    free_at = float("-inf")
    out = []
    for t, s in sorted(zip(scheduled, service, strict=True)):
        free_at = max(t, free_at) + s
        out.append(free_at - t)
    return out
