"""PNG plots (matplotlib, Agg): the offline 4-panel report, comparisons, history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_compare", "plot_history", "plot_offline"]


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_offline(result: dict[str, Any], path: Path) -> Path:
    """Throughput, mean/p95 latency, memory and samples/s per MB against the batch size."""
    fig, axes = _figure(2, 2, (11, 8))
    (thr, lat), (mem, eff) = axes
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        groups.setdefault((row["backend"], row["seq"]), []).append(row)
    width = 0.8 / max(len(groups), 1)
    for i, ((backend, seq), rows) in enumerate(sorted(groups.items())):
        rows = sorted(rows, key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        label = f"{backend} seq {seq}"
        color = f"C{i % 10}"  # one colour per series in every panel (mean and p95 alike)
        thr.plot(b, [r["items_per_s"] or 0 for r in rows], marker="o", label=label, color=color)
        lat.plot(b, [r["mean_ms"] or 0 for r in rows], marker="o", label=f"{label} mean",
                 color=color)  # fmt: skip
        lat.plot(b, [r["p95_ms"] or 0 for r in rows], ls="--", marker="x", color=color,
                 label=f"{label} p95")  # fmt: skip
        x = [j + i * width for j in range(len(rows))]
        mem.bar(x, [r.get("cuda_peak_mb") or r["rss_mb"] for r in rows], width, label=label,
                color=color)  # fmt: skip
        mem.set_xticks(range(len(rows)), [str(v) for v in b])
        eff.plot(b, [r["items_per_s_per_mb"] or 0 for r in rows], marker="o", label=label,
                 color=color)  # fmt: skip
    for ax, title, ylabel in (
        (thr, "Throughput", "samples/s"),
        (lat, "Latency", "ms per batch"),
        (mem, "Peak memory", "MB (RSS, or CUDA peak)"),
        (eff, "Efficiency", "samples/s per MB"),
    ):
        ax.set_title(title)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (thr, lat, eff):
        ax.set_xscale("log", base=2)
    fig.suptitle(f"kiln bench offline: {result.get('name', '')}")
    return _save(fig, path)


def plot_compare(rows: list[dict[str, Any]], path: Path) -> Path:
    """One bar per metric: the ratio B/A with its bootstrap interval (1.0 = no change)."""
    fig, axes = _figure(1, 1, (max(6, len(rows) * 0.9), 4))
    ax = axes[0][0]
    names = [f"{r['run']}\n{r['metric']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    low = [r["ratio"] - r["ci"][0] for r in rows]
    high = [r["ci"][1] - r["ratio"] for r in rows]
    ax.bar(range(len(rows)), ratios, yerr=[low, high], capsize=4, color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ratio to the first run (95 % CI)")
    return _save(fig, path)


def plot_history(entries: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """``metric`` of every history entry over time, one line per label."""
    fig, axes = _figure(1, 1, (9, 4))
    ax = axes[0][0]
    by_label: dict[str, list[tuple[int, float]]] = {}
    for i, e in enumerate(entries):
        v = (e.get("metrics") or {}).get(metric)
        if isinstance(v, int | float):
            by_label.setdefault(str(e.get("label", "")), []).append((i, float(v)))
    for label, points in by_label.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label or "-")
    ax.set_xticks(range(len(entries)), [str(e.get("time", ""))[:16] for e in entries],
                  rotation=45, ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
