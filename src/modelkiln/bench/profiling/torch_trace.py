"""torch.profiler over a few forward passes: a Chrome trace and the top ops by self time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def top_ops(prof: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` ops by self CPU time (and self CUDA time when a GPU ran), as dicts."""
    events = list(prof.key_averages())
    cuda = any(getattr(e, "self_device_time_total", 0) for e in events)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key, 0) for e in events) or 1.0
    rows = []
    for e in sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]:
        rows.append(
            {
                "name": e.key,
                "calls": e.count,
                "self_ms": getattr(e, key, 0) / 1000,
                "self_pct": 100 * getattr(e, key, 0) / total,
                "self_cpu_ms": e.self_cpu_time_total / 1000,
                "self_cuda_ms": getattr(e, "self_device_time_total", 0) / 1000 if cuda else None,
                "cpu_memory_mb": getattr(e, "self_cpu_memory_usage", 0) / 2**20,
            }
        )
    return rows


def torch_trace(
    forward: Callable[[dict[str, Any]], Any],
    inputs: dict[str, Any],
    out: Path,
    steps: int,
    top: int,
    *,
    cuda: bool = False,
) -> dict[str, Any]:
    """Profile ``steps`` calls of ``forward(inputs)`` (after one warm-up); write the trace.

    ``forward`` is any torch forward pass (an HF module, a TorchScript or
    torch.export program, torchao-quantized weights); ``cuda`` adds GPU activity.
    Writes ``out/trace.json`` (Chrome trace).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    forward(inputs)  # warm-up: first-call allocations (and program optimisation) stay out
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for _ in range(steps):
            forward(inputs)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    return {"trace": str(trace), "top_ops": top_ops(prof, top)}
