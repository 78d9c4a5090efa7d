"""The offline sweep: (backend, batch, seq) cells timed in interleaved rounds.

Rounds are interleaved — one call of every live cell of a group per round — so
a noisy neighbour slows every cell alike instead of whichever happened to run
then (the sweep groups the backends of one shape, see ``sweep._time_by_shape``).
Each cell first gets ``warmup`` untimed calls (in ascending size, which is when
its memory is read: RSS only grows, so the reading after a cell's warmup is the
peak up to that size). A cell stops when its estimate is stable (the standard
error of the mean below ``cv_target`` of the mean, after ``min_runs``), at
``max_runs``, or when the sweep's time budget runs out: the loop always ends.

Hand-written rather than pytest-benchmark / pyperf: neither interleaves
configurations, and both time one callable per process run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from modelkiln.bench.offline.runners import Runner
from modelkiln.bench.results import percentile


@dataclass
class Cell:
    """One backend at one shape, and what was measured."""

    runner: Runner
    batch: int
    seq: int
    inputs: Any = None
    times_ms: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    rss_delta_mb: float = 0.0
    cuda_peak_mb: float | None = None
    first_call_ms: float | None = None
    stop: str = ""

    def sem_ratio(self) -> float:
        """Standard error of the mean over the mean (inf with fewer than 2 runs)."""
        n = len(self.times_ms)
        if n < 2:
            return math.inf
        mean = statistics.fmean(self.times_ms)
        return statistics.stdev(self.times_ms) / math.sqrt(n) / mean if mean > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Statistics of the cell (ms, items/s, MB)."""
        t = self.times_ms
        mean = statistics.fmean(t) if t else None
        items = self.batch * 1000 / mean if mean else None
        mem = self.cuda_peak_mb or self.rss_mb
        return {
            "backend": self.runner.name,
            "batch": self.batch,
            "seq": self.seq,
            "runs": len(t),
            "mean_ms": mean,
            "p50_ms": percentile(t, 50),
            "p95_ms": percentile(t, 95),
            "p99_ms": percentile(t, 99),
            "cv": statistics.stdev(t) / mean if mean and len(t) > 1 else None,
            "items_per_s": items,
            "tokens_per_s": items * self.seq if items else None,
            "rss_mb": self.rss_mb,
            "rss_delta_mb": self.rss_delta_mb,
            "cuda_peak_mb": self.cuda_peak_mb,
            "first_call_ms": self.first_call_ms,
            "items_per_s_per_mb": items / mem if items and mem else None,
            "stop": self.stop,
            "times_ms": [round(x, 4) for x in t],
        }


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _cuda_peak_mb(reset: bool = False) -> float | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated()) / 2**20


def _time_one(cell: Cell) -> float:
    t0 = time.perf_counter()
    cell.runner.run(cell.inputs)
    if cell.runner.sync is not None:
        cell.runner.sync()
    return (time.perf_counter() - t0) * 1000


def warm_up(cells: list[Cell], warmup: int) -> None:
    """Build each cell's inputs and run its warmup calls, reading memory after them."""
    base: dict[str, float] = {}
    for cell in sorted(cells, key=lambda c: (c.runner.name, c.batch * c.seq)):
        base.setdefault(cell.runner.name, _rss_mb())
        cell.inputs = cell.runner.make(cell.batch, cell.seq)
        _cuda_peak_mb(reset=True)
        # The first call pays one-off costs (allocations, torch.compile): reported apart.
        cell.first_call_ms = _time_one(cell)
        for _ in range(max(warmup, 1) - 1):
            _time_one(cell)
        cell.rss_mb = _rss_mb()
        cell.rss_delta_mb = cell.rss_mb - base[cell.runner.name]
        cell.cuda_peak_mb = _cuda_peak_mb()


def time_cells(
    cells: list[Cell], *, min_runs: int, max_runs: int, cv_target: float, budget_s: float
) -> None:
    """Interleaved rounds until every cell is stable, at ``max_runs``, or out of time.

    Every cell gets at least one timed call, even with no time left.
    """
    deadline = time.perf_counter() + budget_s
    live = list(cells)
    while live:
        if time.perf_counter() >= deadline and all(c.times_ms for c in live):
            for cell in live:
                cell.stop = "time budget"
            return
        for cell in live:
            cell.times_ms.append(_time_one(cell))
        still = []
        for cell in live:
            n = len(cell.times_ms)
            if n >= min_runs and cell.sem_ratio() <= cv_target:
                cell.stop = "stable"
            elif n >= max_runs:
                cell.stop = "max runs"
            else:
                still.append(cell)
        live = still
