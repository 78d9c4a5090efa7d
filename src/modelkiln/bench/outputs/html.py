"""Self-contained HTML reports (tables + the PNG inlined as base64)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

__all__ = ["offline_html", "table_html"]

_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("-" if v is None else str(v))


def table_html(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """An HTML table of ``rows`` (one dict each) with ``columns``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def offline_html(result: dict[str, Any], png: Path | None, path: Path) -> Path:
    """Write the offline report: environment, optimal batches, every cell, the plot."""
    cols = [
        "backend",
        "batch",
        "seq",
        "runs",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "cv",
        "items_per_s",
        "tokens_per_s",
        "rss_mb",
        "cuda_peak_mb",
        "items_per_s_per_mb",
        "first_call_ms",
        "stop",
    ]
    env = result.get("environment", {})
    img = ""
    if png is not None and png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        img = f'<img alt="benchmark report" src="data:image/png;base64,{data}" width="900">'
    parts = [
        f"<html><head><meta charset='utf-8'><title>kiln bench offline</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>kiln bench offline: {html.escape(str(result.get('name', '')))}</h1>",
        f"<p>{html.escape(', '.join(f'{k}: {v}' for k, v in env.items()))}</p>",
        "<h2>What ran</h2>",
        table_html(
            result.get("variants", []),
            ["backend", "variant", "format", "dtype", "device", "task", "compile"],
        ),
        "<h2>Optimal batch</h2>",
        table_html(result.get("optimal", []), ["backend", "seq", "batch", "items_per_s"]),
        "<h2>Every cell</h2>",
        table_html(result.get("rows", []), cols),
        img,
        "</body></html>",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
