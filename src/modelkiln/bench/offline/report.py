"""Write an offline result as JSON, the 4-panel PNG and the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelkiln.bench.outputs.html import offline_html
from modelkiln.bench.outputs.plot import plot_offline
from modelkiln.bench.outputs.serialized import write_json


def write_offline(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``out/offline.json``, ``out/benchmark_report.png``, ``out/report.html``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(result, out / "offline.json"),
        "png": plot_offline(result, out / "benchmark_report.png"),
    }
    paths["html"] = offline_html(result, paths["png"], out / "report.html")
    return paths
