"""PNG bar chart of measured matmul throughput per dtype, fp32 as the reference."""

from __future__ import annotations

from pathlib import Path

from modelkiln.doctor.measure import DTYPES
from modelkiln.doctor.report import DoctorReport

COLOURS = {"fp32": "#7f7f7f", "bf16": "#1f77b4", "int8": "#ff7f0e"}
LOG_SCALE_SPREAD = 50.0  # bars spanning more than this factor get a log y-axis


def plot_doctor(report: DoctorReport, path: Path) -> Path:
    """Write a bar chart of ``report``'s throughput (one panel per device) to ``path`` as PNG.

    Each bar is labelled with its speed-up over fp32 on the same device; the
    dashed line marks fp32. Rendering uses matplotlib's Agg canvas directly, so
    it needs no display and leaves pyplot's global backend untouched.

    Example:
        >>> plot_doctor(run_doctor(matmul_size=512), Path("doctor.png"))
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    devices = list(dict.fromkeys(t.device for t in report.throughput)) or ["cpu"]
    fig = Figure(figsize=(1.0 + 3.6 * len(devices), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    for ax, device in zip(fig.subplots(1, len(devices), squeeze=False)[0], devices, strict=True):
        _panel(ax, report, device)
    fig.suptitle(f"kiln doctor — matmul throughput — {report.cpu.model}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _panel(ax: object, report: DoctorReport, device: str) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    ax.set_title(device, fontsize=10)
    if not report.throughput:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "not measured\n(run kiln doctor without --quick)", ha="center")
        return
    values: list[float] = []
    for i, dtype in enumerate(DTYPES):
        t = report.measurement(dtype, device)
        value = t.value if t is not None and t.value is not None else 0.0
        values.append(value)
        ax.bar(i, value, color=COLOURS[dtype], width=0.6)
        ratio = report.speedup(dtype, device)
        times = "1× (ref)" if dtype == "fp32" else f"{ratio:.3g}×" if ratio else "no fp32 ref"
        label = f"{value:,.0f}\n{times}" if value >= 100 else f"{value:.3g}\n{times}"
        label = label if value else "n/a"
        y = value if value else 0.0
        ax.annotate(
            label, (i, y), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points"
        )
    sizes = [report.measurement(d, device) for d in DTYPES]
    ax.set_xticks(
        range(len(DTYPES)),
        [
            f"{d}\nn={t.size}" if t is not None and t.size else d
            for d, t in zip(DTYPES, sizes, strict=True)
        ],
    )
    if values[0]:
        ax.axhline(values[0], color=COLOURS["fp32"], linestyle="--", linewidth=1)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_SPREAD:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, max(positive) * 5)  # room for the labels
        ax.set_ylabel("GFLOP/s, int8: GOP/s (log scale)")
    else:
        ax.set_ylim(0, max(positive, default=1.0) * 1.3)
        ax.set_ylabel("GFLOP/s, int8: GOP/s")
