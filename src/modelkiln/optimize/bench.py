"""Latency and throughput of several variants, measured side by side.

Variants run **interleaved**, one call each per round, so a noisy neighbour
slows every variant alike instead of whichever happened to be running.
Shapes go smallest first; a variant whose median is ``slow_abort`` times the
baseline's is dropped from later rounds and larger shapes (it could never be
chosen), which keeps a 40x-slower bf16 on an AVX2 CPU from eating the budget.

Example:
    >>> timings = benchmark({"torch-fp32": r0, "onnx-int8-dynamic": r1}, make, BenchConfig(),
    ...                     baseline="torch-fp32")
    >>> timings["onnx-int8-dynamic"][0].p50_ms
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from modelkiln.optimize.config import BenchConfig
from modelkiln.progress import QUIET, Progress
from modelkiln.stats import percentile

Batch = dict[str, Any]


@dataclass
class Timing:
    """One variant at one (batch, seq) shape."""

    variant: str
    batch: int
    seq: int
    runs: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    items_per_s: float | None = None
    tokens_per_s: float | None = None
    aborted: str = ""
    times_ms: list[float] = field(default_factory=list, repr=False)

    def finish(self) -> Timing:
        """Fill the statistics from ``times_ms``."""
        if self.times_ms:
            self.runs = len(self.times_ms)
            self.p50_ms = percentile(self.times_ms, 50)
            self.p95_ms = percentile(self.times_ms, 95)
            self.mean_ms = statistics.fmean(self.times_ms)
            self.items_per_s = self.batch * 1000 / self.mean_ms
            self.tokens_per_s = self.items_per_s * self.seq
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (rounded)."""
        d = asdict(self)
        d["times_ms"] = [round(t, 3) for t in self.times_ms]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for the block (no-op for None)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_call(run: Callable[[Batch], Any], batch: Batch) -> float:
    start = time.perf_counter()
    run(batch)
    return (time.perf_counter() - start) * 1000


def benchmark(
    runners: dict[str, Callable[[Batch], Any]],
    make_batch: Callable[[int, int], Batch],
    cfg: BenchConfig,
    baseline: str,
    progress: Progress = QUIET,
) -> dict[str, list[Timing]]:
    """Time every runner at every configured shape; return ``{variant: [Timing per shape]}``.

    ``runners[name](batch)`` runs one forward pass; ``make_batch(batch, seq)``
    builds the inputs. ``baseline`` must be one of the runners.
    """
    assert baseline in runners, "the baseline must be benchmarked"
    shapes = sorted(
        ((b, s) for b in cfg.batch_sizes for s in cfg.seq_lengths), key=lambda x: x[0] * x[1]
    )
    results: dict[str, list[Timing]] = {name: [] for name in runners}
    dropped: dict[str, str] = {}
    with torch_threads(cfg.threads):
        for b, s in progress.track(shapes, "benchmark shapes"):
            batch = make_batch(b, s)
            timings = {name: Timing(name, b, s) for name in runners}
            active = [n for n in runners if n not in dropped]
            for name in set(runners) - set(active):
                timings[name].aborted = f"skipped: {dropped[name]}"
            progress.message(f"benchmark batch {b} x {s} tokens: {', '.join(active)}")
            _measure(runners, batch, timings, active, cfg, baseline, dropped)
            for name, timing in timings.items():
                results[name].append(timing.finish())
    return results


def _measure(
    runners: dict[str, Callable[[Batch], Any]],
    batch: Batch,
    timings: dict[str, Timing],
    active: list[str],
    cfg: BenchConfig,
    baseline: str,
    dropped: dict[str, str],
) -> None:
    """Warm up, then interleaved rounds until the run count and time bounds are met.

    A variant is dropped once the median of at least two of its timed runs is
    ``slow_abort`` times the baseline's (warmup calls carry one-off setup costs).
    """
    for name in active:
        for _ in range(cfg.warmup):
            runners[name](batch)
    started = time.perf_counter()
    for round_no in range(cfg.max_runs):
        for name in list(active):
            timings[name].times_ms.append(_time_call(runners[name], batch))
        base = statistics.median(timings[baseline].times_ms)
        for name in [n for n in active if n != baseline]:
            mine = timings[name].times_ms
            ratio = statistics.median(mine) / base
            if len(mine) >= min(2, cfg.max_runs) and ratio > cfg.slow_abort:
                _drop(name, ratio, timings, active, dropped)
        if round_no + 1 >= cfg.min_runs and time.perf_counter() - started > cfg.max_seconds:
            break


def _drop(
    name: str,
    ratio: float,
    timings: dict[str, Timing],
    active: list[str],
    dropped: dict[str, str],
) -> None:
    reason = f"{ratio:.1f}x slower than the baseline"
    timings[name].aborted = f"stopped: {reason}"
    active.remove(name)
    dropped[name] = reason
