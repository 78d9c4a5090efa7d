"""Small statistics shared by every stage's reports (torch-free, numpy-free).

Hand-written because it is five lines and the reports need it without numpy
(``kiln serve`` load reports run in torch-free processes); it matches
``numpy.percentile(..., method="linear")``.

Example:
    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    >>> percentile_or_none([], 99) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["percentile", "percentile_or_none"]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def percentile_or_none(values: Sequence[float], q: float) -> float | None:
    """:func:`percentile`, or None for no values (a report cell shown as a dash)."""
    return percentile(values, q) if values else None
