"""The handbook's ``compare_models``: one markdown table and one PNG for every variant.

Columns: status, size on disk, p50 / p95 latency at each benchmarked shape,
throughput at the largest batch, quality and its ratio to the baseline, and
the speed-up ``auto`` ranked by.

Example:
    >>> print(compare_models(result.cards, cfg.bench, "torch-fp32"))
    >>> plot_comparison(result.cards, cfg.bench, Path("out/comparison.png"))
"""

from __future__ import annotations

from pathlib import Path

from modelkiln.optimize.auto import objective_shape
from modelkiln.optimize.config import BenchConfig
from modelkiln.optimize.gate import EvalCard


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _shapes(cfg: BenchConfig) -> list[tuple[int, int]]:
    return [(b, s) for s in sorted(cfg.seq_lengths) for b in sorted(cfg.batch_sizes)]


def compare_models(cards: dict[str, EvalCard], cfg: BenchConfig, baseline: str) -> str:
    """A markdown table comparing every variant (baseline first)."""
    shapes = _shapes(cfg)
    big = (max(cfg.batch_sizes), max(cfg.seq_lengths))
    head = ["variant", "status", "size MB"]
    head += [f"p50 / p95 ms b{b}x{s}" for b, s in shapes]
    head += [f"items/s b{big[0]}", "quality", "ratio", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [baseline] + [n for n in cards if n != baseline]
    for name in order:
        card = cards.get(name)
        if card is None:
            continue
        row = [f"`{name}`", card.status, f"{card.size_bytes / 1e6:.1f}"]
        for b, s in shapes:
            t = card.timing(b, s) or {}
            if t.get("p50_ms") is None:
                row.append("—")
            else:
                note = " (stopped)" if t.get("aborted") else ""
                row.append(f"{t['p50_ms']:.1f} / {t['p95_ms']:.1f}{note}")
        t_big = card.timing(*big) or {}
        row.append(_fmt(None if t_big.get("aborted") else t_big.get("items_per_s")))
        q = card.quality or {}
        row.append(f"{q['metric']} {q['value']:.4f}" if q.get("value") is not None else "—")
        row.append(_fmt(q.get("ratio"), ".4f"))
        row.append("—" if card.speedup is None else f"{card.speedup:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    batch, seq = objective_shape(cfg)
    lines.append("")
    lines.append(
        f"Speed-up: {cfg.objective} vs `{baseline}` at batch {batch} x {seq} tokens. "
        "Quality ratio: variant / baseline (baseline / variant for lower-is-better metrics)."
    )
    return "\n".join(lines) + "\n"


def plot_comparison(cards: dict[str, EvalCard], cfg: BenchConfig, path: Path) -> Path | None:
    """Bar charts: p50 latency per shape, throughput, quality ratio. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(cards)
    shapes = _shapes(cfg)
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(4.2 * (len(shapes) + 1), 3.8))
    for ax, (b, s) in zip(axes[:-1], shapes, strict=True):
        values = [((cards[n].timing(b, s) or {}).get("p50_ms") or 0.0) for n in names]
        bars = ax.barh(names, values, color="#4c72b0")
        for bar, n in zip(bars, names, strict=True):
            if (cards[n].timing(b, s) or {}).get("aborted"):
                bar.set_color("#bbbbbb")
        ax.set_title(f"p50 latency, batch {b} x {s} (ms)")
        ax.invert_yaxis()
    ax = axes[-1]
    ratios = [((cards[n].quality or {}).get("ratio") or 0.0) for n in names]
    colors = ["#c44e52" if cards[n].status == "rejected" else "#55a868" for n in names]
    ax.barh(names, ratios, color=colors)
    ax.set_xlim(min([0.9, *[r for r in ratios if r]]), max([1.02, *ratios]))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_title("quality / baseline")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
