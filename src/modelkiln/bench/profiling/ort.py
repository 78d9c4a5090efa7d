"""ONNX Runtime's own profiler over a few runs: its Chrome trace and the top ops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def ort_trace(
    model_onnx: Path, feeds: dict[str, Any], out: Path, steps: int, top: int
) -> dict[str, Any]:
    """Profile ``steps`` runs of ``model_onnx``; write ``out/trace.json`` (Chrome trace)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out / "ort")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_onnx), options, providers=["CPUExecutionProvider"])
    for _ in range(steps + 1):
        session.run(None, feeds)
    raw = Path(session.end_profiling())
    trace = out / "trace.json"
    shutil.move(raw, trace)
    events = json.loads(trace.read_text())
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = (e.get("args") or {}).get("op_name", e["name"])
            totals.setdefault(op, []).append(float(e.get("dur", 0)))
    grand = sum(sum(v) for v in totals.values()) or 1.0
    rows = [
        {"name": op, "calls": len(d), "self_ms": sum(d) / 1000, "self_pct": 100 * sum(d) / grand}
        for op, d in totals.items()
    ]
    rows.sort(key=lambda r: float(r["self_ms"]), reverse=True)  # type: ignore[arg-type]
    return {"trace": str(trace), "top_ops": rows[:top]}
