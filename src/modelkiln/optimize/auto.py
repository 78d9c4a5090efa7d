"""``target: auto``: the fastest variant that passes the gate and clearly beats the baseline.

Pure logic over eval cards (no model, no clock): speed is read from each
card's latency at the objective shape — throughput at the largest batch, or
p50 latency at the smallest — both at the longest sequence. A candidate must

1. have passed the quality gate (status ``passed``),
2. have been timed at that shape (not stopped early as too slow), and
3. be at least ``min_speedup`` times faster than the baseline there;

otherwise the baseline is kept. So a variant slower than the baseline is never
chosen (int8 slower than fp32 is a classic trap on CPUs without VNNI / AMX).

Example:
    >>> decision = choose(cards, "torch-fp32", BenchConfig(), min_speedup=1.05)
    >>> decision.chosen, decision.speedup
    ('onnx-int8-dynamic', 2.1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modelkiln.optimize.config import BenchConfig
from modelkiln.optimize.gate import EvalCard


@dataclass
class Decision:
    """What ``auto`` chose and why every other variant was not chosen."""

    chosen: str
    objective: str
    batch: int
    seq: int
    speedup: float
    considered: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def objective_shape(cfg: BenchConfig) -> tuple[int, int]:
    """(batch, seq) that ``auto`` ranks at."""
    batch = max(cfg.batch_sizes) if cfg.objective == "throughput" else min(cfg.batch_sizes)
    return batch, max(cfg.seq_lengths)


def speed(card: EvalCard, batch: int, seq: int, objective: str) -> float | None:
    """Higher-is-better speed of a card at one shape (None if not timed there)."""
    t = card.timing(batch, seq)
    if t is None or t.get("aborted") or not t.get("p50_ms"):
        return None
    return float(t["items_per_s"]) if objective == "throughput" else 1000.0 / float(t["p50_ms"])


def speedups(
    cards: dict[str, EvalCard], baseline: str, cfg: BenchConfig
) -> dict[str, float | None]:
    """Each variant's speed / the baseline's at the objective shape."""
    batch, seq = objective_shape(cfg)
    base = speed(cards[baseline], batch, seq, cfg.objective)
    out: dict[str, float | None] = {}
    for name, card in cards.items():
        mine = speed(card, batch, seq, cfg.objective)
        out[name] = mine / base if mine is not None and base else None
    return out


def choose(
    cards: dict[str, EvalCard], baseline: str, cfg: BenchConfig, *, min_speedup: float = 1.05
) -> Decision:
    """Pick the variant to promote; ``considered`` explains every decision."""
    batch, seq = objective_shape(cfg)
    ups = speedups(cards, baseline, cfg)
    considered: dict[str, str] = {}
    best, best_up = baseline, 1.0
    for name, card in cards.items():
        if name == baseline:
            continue
        up = ups.get(name)
        if card.status != "passed":
            considered[name] = f"not eligible: {card.status} ({'; '.join(card.reasons)})"
        elif up is None:
            timing = card.timing(batch, seq) or {}
            considered[name] = f"not eligible: {timing.get('aborted') or 'not timed'}"
        elif up < min_speedup:
            what = "slower than" if up < 1 else "not clearly faster than"
            considered[name] = f"not chosen: {what} the baseline ({up:.2f}x < {min_speedup}x)"
        else:
            considered[name] = f"eligible: {up:.2f}x the baseline"
            if up > best_up:
                best, best_up = name, up
    if best != baseline:
        considered[best] = f"chosen: {best_up:.2f}x the baseline"
    considered[baseline] = "baseline" + (" (kept: no variant beat it)" if best == baseline else "")
    return Decision(best, cfg.objective, batch, seq, round(best_up, 4), considered)
