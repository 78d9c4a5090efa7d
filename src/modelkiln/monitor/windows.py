"""Fixed-memory sliding windows: one preallocated ring buffer per feature.

The handbook appended to a ``deque`` from request handlers and read it from a
checker without a lock (§19: a race, and unbounded memory for vectors). Here a
window owns one numpy array of ``capacity`` rows allocated on first use;
``append`` writes one row under a lock and ``values`` copies the window out
(oldest first) under the same lock, so the checker never sees a torn row.

Example:
    >>> w = Window(3)
    >>> for v in (1.0, 2.0, 3.0, 4.0):
    ...     w.append(v)
    >>> w.values().tolist(), w.total
    ([2.0, 3.0, 4.0], 4)
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class Window:
    """The last ``capacity`` values of one feature (scalars or fixed-width vectors)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a window holds at least one value")
        self.capacity = capacity
        self._buf: np.ndarray | None = None
        self._next = 0
        self._count = 0
        self.total = 0  # values ever appended (the window keeps the last ``capacity``)
        self._lock = threading.Lock()

    def append(self, value: Any) -> None:
        """Add one value (a float, or a 1-d vector of the width of the first one)."""
        scalar = isinstance(value, float | int)
        row = value if scalar else np.asarray(value, dtype=np.float32)  # no array per scalar
        shape = () if scalar else row.shape
        with self._lock:
            if self._buf is None:
                self._buf = np.empty((self.capacity, *shape), np.float64 if scalar else np.float32)
            if shape != self._buf.shape[1:]:
                return  # a vector of another width (another model head): not comparable
            self._buf[self._next] = row
            self._next = (self._next + 1) % self.capacity
            self._count = min(self._count + 1, self.capacity)
            self.total += 1

    def values(self) -> np.ndarray:
        """A copy of the window, oldest value first."""
        with self._lock:
            if self._buf is None:
                return np.empty(0)
            if self._count < self.capacity:
                return self._buf[: self._count].copy()
            return np.concatenate([self._buf[self._next :], self._buf[: self._next]])

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        """Forget every value (the memory stays allocated)."""
        with self._lock:
            self._next = self._count = 0
