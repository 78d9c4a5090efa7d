"""The offline benchmark: configuration, the sweep, and the optimal batch.

Example:
    >>> result = run_offline(OfflineConfig(model="runs/quickstart/train/model",
    ...                                    batches=[1, 8, 32], seqs=[128]))
    >>> result["optimal"][0]["batch"]
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from modelkiln.bench.offline.runners import Runner, compiled_runner, load_runners
from modelkiln.bench.offline.timing import Cell, time_cells, warm_up
from modelkiln.configbase import KilnModel
from modelkiln.errors import ConfigError


class OfflineConfig(KilnModel):
    """What ``kiln bench offline`` sweeps."""

    model: str = Field(description="Model directory or optimize variant directory.")
    others: list[str] = Field(
        default_factory=list,
        description="More model / variant directories, timed interleaved with ``model``.",
    )
    backends: list[str] | None = Field(None, description="torch / onnx; default: all it holds.")
    batches: list[int] = Field(
        default_factory=lambda: [1, 8, 16, 32, 64], description="Batch sizes, swept ascending."
    )
    seqs: list[int] = Field(default_factory=lambda: [128], description="Sequence lengths.")
    warmup: int = Field(3, ge=0, description="Untimed calls per cell.")
    min_runs: int = Field(5, ge=2, description="Timed calls before a cell may stop.")
    max_runs: int = Field(200, ge=2, description="Timed calls at most per cell.")
    cv_target: float = Field(
        0.02, gt=0, description="Stop a cell when the mean's standard error is below this share."
    )
    budget_s: float = Field(60.0, gt=0, description="Time budget of the timed rounds.")
    threads: int | None = Field(None, ge=1, description="Intra-op threads (default: library's).")
    memory_cap_mb: float | None = Field(None, gt=0, description="Optimal batch memory cap.")
    min_gain: float = Field(0.05, ge=0, description="Optimal batch: least throughput gain.")
    compile: bool = Field(
        False, description="Also time torch.compile(dynamic=True) of each torch model, interleaved."
    )
    compile_backend: str = Field("inductor", description="torch.compile backend (with compile).")


def optimal_batch(
    rows: list[dict[str, Any]], min_gain: float = 0.05, memory_cap_mb: float | None = None
) -> dict[str, Any] | None:
    """The largest batch that still improves throughput by more than ``min_gain`` (in a cap).

    ``rows`` are one backend at one sequence length. Walks the batches ascending
    and stops at the first that gains too little or exceeds the cap: it looks at
    each measured batch at most once, so it always stops.
    """
    best: dict[str, Any] | None = None
    for row in sorted(rows, key=lambda r: r["batch"]):
        mem = row.get("cuda_peak_mb") or row.get("rss_mb") or 0.0
        if not row.get("items_per_s") or (memory_cap_mb is not None and mem > memory_cap_mb):
            break
        if best is not None and row["items_per_s"] <= best["items_per_s"] * (1 + min_gain):
            break
        best = row
    return best


def _time_by_shape(cells: list[Cell], cfg: OfflineConfig) -> None:
    """Shapes smallest first; the backends of one shape interleaved round by round.

    Interleaving backends makes a noisy neighbour slow them alike; shapes are not
    interleaved with each other (a large batch between two small ones evicts their
    caches and skews them). Each shape gets an equal share of the time left.
    """
    shapes = sorted({(c.batch * c.seq, c.batch, c.seq) for c in cells})
    deadline = time.perf_counter() + cfg.budget_s
    for i, (_, batch, seq) in enumerate(shapes):
        group = [c for c in cells if (c.batch, c.seq) == (batch, seq)]
        share = max(deadline - time.perf_counter(), 0.0) / (len(shapes) - i)
        time_cells(
            group,
            min_runs=cfg.min_runs,
            max_runs=cfg.max_runs,
            cv_target=cfg.cv_target,
            budget_s=share,
        )


def _environment() -> dict[str, Any]:
    from modelkiln.hardware import cpu_class

    return {
        "cpu_class": str(cpu_class()),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _all_runners(cfg: OfflineConfig) -> list[Runner]:
    """Every model's runners; with several models each is named ``VARIANT:backend``.

    One sweep interleaves them shape by shape, so the ratio between two variants
    is measured side by side (a separate run per variant would see a different
    machine load).
    """
    models = [cfg.model, *cfg.others]
    groups = [load_runners(m, cfg.backends, cfg.threads) for m in models]
    if len(models) == 1:
        return groups[0]
    out: list[Runner] = []
    for model, group in zip(models, groups, strict=True):
        for runner in group:
            label = f"{runner.meta.get('variant') or Path(model).name}:{runner.name}"
            while label in {r.name for r in out}:  # the same variant twice: number them
                label += "'"
            runner.name = label
            out.append(runner)
    return out


def _with_compiled(
    runners: list[Runner], cfg: OfflineConfig
) -> tuple[list[Runner], list[dict[str, Any]]]:
    """Each torch runner followed by its compiled twin; the twins' largest output difference.

    The difference is measured on one small batch (the first compile happens here, so
    the first timed shape's ``first_call_ms`` shows only a guard check or a recompile).
    """
    out: list[Runner] = []
    checks = []
    for runner in runners:
        out.append(runner)
        if runner.meta.get("backend") != "torch" or runner.module is None:
            continue  # ONNX graphs and TorchScript / torch.export programs: nothing to compile
        twin = compiled_runner(runner, cfg.compile_backend)
        feed = runner.make(1, min(cfg.seqs))
        t0 = time.perf_counter()
        assert runner.loaded is not None  # every loaded runner keeps its LoadedVariant
        got = runner.loaded.main_of(twin.run(feed))
        first_s = time.perf_counter() - t0
        diff = float(abs(got - runner.loaded.main_of(runner.run(feed))).max())
        checks.append({"backend": twin.name, "max_abs_diff": diff, "first_compile_s": first_s})
        out.append(twin)
    if not checks:
        raise ConfigError(
            "--compile: no model here has Hugging Face weights to compile "
            f"(formats: {sorted({str(r.meta.get('format')) for r in runners})})",
            hint="compile applies to torch fp32 / bf16 / pruned / distilled models",
        )
    return out, checks


def run_offline(cfg: OfflineConfig) -> dict[str, Any]:
    """Sweep every backend × batch × seq; return rows, optimal batches and the environment.

    Raises:
        ArtifactError / ConfigError: the model or a backend cannot be loaded.
    """
    runners = _all_runners(cfg)
    compiled: list[dict[str, Any]] = []
    if cfg.compile:
        runners, compiled = _with_compiled(runners, cfg)
    cells = []
    for runner in runners:
        for seq in sorted(set(cfg.seqs)):
            if runner.max_positions and seq > runner.max_positions:
                continue  # the model cannot take it
            cells += [Cell(runner, b, seq) for b in sorted(set(cfg.batches))]
    started = time.perf_counter()
    warm_up(cells, cfg.warmup)
    _time_by_shape(cells, cfg)
    rows = [c.to_dict() for c in cells]
    optimal = []
    for runner in runners:
        for seq in sorted(set(cfg.seqs)):
            group = [r for r in rows if r["backend"] == runner.name and r["seq"] == seq]
            best = optimal_batch(group, cfg.min_gain, cfg.memory_cap_mb)
            if best is not None:
                optimal.append(
                    {
                        "backend": runner.name,
                        "seq": seq,
                        "batch": best["batch"],
                        "items_per_s": best["items_per_s"],
                    }
                )
    top = max(rows, key=lambda r: r["items_per_s"] or 0.0) if rows else {}
    return {
        "name": " vs ".join(Path(m).name for m in [cfg.model, *cfg.others]),
        "model": str(cfg.model),
        "config": cfg.model_dump(),
        "environment": _environment(),
        "variants": [r.meta for r in runners],
        "compile_checks": compiled,
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "optimal": optimal,
        "headline": {
            "best_items_per_s": top.get("items_per_s"),
            "p50_ms_at_batch1": next((r["p50_ms"] for r in rows if r["batch"] == 1), None),
        },
    }
