"""Training monitor: per-step training numbers plus CPU / RAM / GPU samples, plots, a report.

:class:`TrainingMonitor` is a ``TrainerCallback``. Per optimizer step it records
the step time, tokens/s and learning rate; at the Trainer's ``logging_steps``
it adds the train loss and gradient norm (``Trainer`` computes those only
when it logs) and the eval loss when it evaluates. A background thread
(:class:`ResourceSampler`) samples process CPU %, RSS and system RAM every
``sample_interval_s`` with ``psutil``, plus GPU memory (and utilization when
``pynvml`` is installed) through ``torch.cuda``. Everything is appended to
``monitor.jsonl`` (one JSON object per line, ``kind`` = ``step`` or
``system``); at the end of each run it draws ``monitor_<phase>.png`` and
:func:`render_monitor_section` turns the rows into a markdown section.

``report_to`` integrations (TensorBoard, MLflow, W&B, ...) are Trainer's own;
:func:`check_report_to` fails early, with the pip command, when a requested
one is not installed (Trainer would fail only once training starts).

Example:
    >>> monitor = TrainingMonitor(Path("out/monitor"))
    >>> trainer = MonitoredTrainer(model=model, args=args, train_dataset=ds, monitor=monitor)
    >>> trainer.train()  # writes out/monitor/monitor.jsonl and monitor_train.png
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from modelkiln.errors import ConfigError
from modelkiln.train.config import MonitorConfig

__all__ = [
    "MONITOR_FILE", "MonitorConfig", "MonitoredTrainer", "ResourceSampler", "TrainingMonitor",
    "check_report_to", "plot_monitor", "read_monitor", "render_monitor_section",
]  # fmt: skip

MONITOR_FILE = "monitor.jsonl"
_MB = 1024 * 1024
_INTEGRATION_PACKAGES = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "neptune": "neptune",
    "dvclive": "dvclive",
    "trackio": "trackio",
    "swanlab": "swanlab",
    "codecarbon": "codecarbon",
}


def check_report_to(names: Sequence[str]) -> list[str]:
    """Validate ``train.report_to`` before training; return the list to give ``Trainer``.

    ``[]`` and ``["none"]`` log nowhere; ``["all"]`` logs to every installed integration
    (none is installed in the default environment, so it quietly logs nowhere).

    Raises:
        ConfigError: an unknown integration name, or a requested one that is not installed.
    """
    import importlib.util

    wanted = [n for n in names if n != "none"]
    if wanted == ["all"]:
        return ["all"]
    for name in wanted:
        if name not in _INTEGRATION_PACKAGES:
            raise ConfigError(
                f"train.report_to: unknown integration {name!r}",
                hint=f"use one of {', '.join(sorted(_INTEGRATION_PACKAGES))}, 'all' or 'none'",
            )
        if importlib.util.find_spec(_INTEGRATION_PACKAGES[name]) is None:
            raise ConfigError(
                f"train.report_to asks for {name!r} but the {name} package is not installed",
                hint=f"pip install {_INTEGRATION_PACKAGES[name]}, or remove it from "
                "train.report_to",
            )
    return wanted


class ResourceSampler:
    """Background thread sampling this process's CPU %, RSS, system RAM and GPU memory.

    Use as a context manager or call :meth:`start` / :meth:`stop`; :meth:`stop`
    joins the thread. Each sample is passed to ``sink`` (a dict, ``kind`` = ``system``).
    """

    def __init__(self, interval_s: float, sink: Any, *, gpu: bool = True) -> None:
        import psutil

        self.interval_s = interval_s
        self.sink = sink
        self.gpu = gpu
        self.latest: dict[str, Any] = {}
        self._process = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()

    def sample(self) -> dict[str, Any]:
        """One sample now (CPU % is averaged since the previous sample)."""
        import psutil

        mem = self._process.memory_info()
        row: dict[str, Any] = {
            "kind": "system",
            "time": round(time.time(), 3),
            "elapsed_s": round(time.time() - self._t0, 3),
            "cpu_percent": self._process.cpu_percent(None),
            "rss_mb": round(mem.rss / _MB, 1),
            "ram_percent": psutil.virtual_memory().percent,
        }
        row.update(self._gpu_sample())
        self.latest = row
        return row

    def _gpu_sample(self) -> dict[str, Any]:
        import torch

        if not (self.gpu and torch.cuda.is_available()):
            return {}
        out: dict[str, Any] = {}
        for i in range(torch.cuda.device_count()):
            out[f"gpu{i}_allocated_mb"] = round(torch.cuda.memory_allocated(i) / _MB, 1)
            out[f"gpu{i}_reserved_mb"] = round(torch.cuda.memory_reserved(i) / _MB, 1)
            out[f"gpu{i}_peak_mb"] = round(torch.cuda.max_memory_allocated(i) / _MB, 1)
            # utilization needs pynvml (or amdsmi); the memory figures do not
            with contextlib.suppress(ModuleNotFoundError, RuntimeError):
                out[f"gpu{i}_util_percent"] = torch.cuda.utilization(i)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sink(self.sample())

    def start(self) -> ResourceSampler:
        """Take a first sample and start the thread (no-op when already running)."""
        if self._thread is None:
            self._stop.clear()
            self._process.cpu_percent(None)  # primes the CPU counter
            self.sink(self.sample())
            self._thread = threading.Thread(target=self._run, name="kiln-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and join the thread, then take a last sample."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sink(self.sample())

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TrainingMonitor(TrainerCallback):
    """Records per-step training numbers and resource samples into ``out_dir/monitor.jsonl``.

    One monitor can follow several ``Trainer`` runs (the train stage's phases); rows carry
    the run's ``phase`` (``TrainingArguments.run_name``, else ``"train"``).

    Args:
        out_dir: where ``monitor.jsonl`` and the plots go (created).
        config: sampling and plotting settings.
        block_size: tokens per training sequence of packed data, for tokens/s (times the
            batch size, accumulation and world size); 0 = count the non-padding tokens seen
            by :class:`MonitoredTrainer` (unknown with a bare callback).
    """

    def __init__(
        self, out_dir: Path, config: MonitorConfig | None = None, *, block_size: int = 0
    ) -> None:
        self.out_dir = Path(out_dir)
        self.config = config or MonitorConfig()
        self.block_size = block_size
        self.tokens_per_step = 0
        self.path = self.out_dir / MONITOR_FILE
        self.phase = "train"
        self.plots: list[Path] = []
        self.counted_tokens = 0
        self._lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._t0 = 0.0
        self._sampler: ResourceSampler | None = None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (thread-safe: the sampler thread writes too)."""
        row = {"phase": self.phase, **row}
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _flush(self) -> None:
        if self._pending is not None:
            self.write(self._pending)
            self._pending = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_name = getattr(args, "run_name", None)
        self.phase = run_name if run_name and run_name != args.output_dir else "train"
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.tokens_per_step = self.block_size * batch * args.world_size
        self._sampler = ResourceSampler(
            self.config.sample_interval_s, self.write, gpu=self.config.gpu
        ).start()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush()
        self.counted_tokens = 0
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        seconds = time.perf_counter() - self._t0
        tokens = self.tokens_per_step or self.counted_tokens
        scheduler = kw.get("lr_scheduler")
        lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else None
        latest = self._sampler.latest if self._sampler else {}
        self._pending = {
            "kind": "step",
            "step": state.global_step,
            "time": round(time.time(), 3),
            "step_time_s": round(seconds, 5),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds else None,
            "lr": lr,
            "loss": None,
            "grad_norm": None,
            "eval_loss": None,
            "rss_mb": latest.get("rss_mb"),
            "cpu_percent": latest.get("cpu_percent"),
        }

    def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        logs = kw.get("logs") or {}
        row = self._pending
        if row is None or row["step"] != state.global_step:
            return
        for key, name in (("loss", "loss"), ("grad_norm", "grad_norm"), ("eval_loss", "eval_loss")):
            if key in logs:
                row[name] = float(logs[key])
        if "learning_rate" in logs:  # Trainer's value is the lr the step used
            row["lr"] = float(logs["learning_rate"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush()
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if state.is_world_process_zero and self.config.plots and self.path.is_file():
            rows = [r for r in read_monitor(self.path) if r["phase"] == self.phase]
            self.plots.append(plot_monitor(rows, self.out_dir / f"monitor_{self.phase}.png"))

    def close(self) -> None:
        """Stop the sampler if a run ended without ``on_train_end`` (an exception)."""
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None


def read_monitor(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``monitor.jsonl``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_monitor(rows: list[dict[str, Any]], path: Path) -> Path:
    """Six panels: loss, learning rate, grad norm, tokens/s per step; CPU % and RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["kind"] == "step"]
    system = [r for r in rows if r["kind"] == "system"]
    t0 = min((r["time"] for r in rows), default=0.0)
    for r in system:
        r["t"] = r["time"] - t0
    panels = [
        (steps, "step", "loss", "train loss"),
        (steps, "step", "lr", "learning rate"),
        (steps, "step", "grad_norm", "grad norm (before clipping)"),
        (steps, "step", "tokens_per_s", "tokens/s"),
        (system, "t", "cpu_percent", "process CPU % (100 = one core)"),
        (system, "t", "rss_mb", "RSS (MB)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6))
    for ax, (data, x, y, title) in zip(axes.flat, panels, strict=True):
        xs, ys = _series(data, x, y)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color="#4f81bd")
        ax.set_title(title)
        ax.set_xlabel("optimizer step" if x == "step" else "seconds")
        ax.grid(alpha=0.3)
    fig.suptitle(f"training monitor: {rows[0]['phase'] if rows else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_monitor_section(path: Path, plots: Sequence[Path] = ()) -> str:
    """Markdown ``### Training monitor``: per phase step time, tokens/s, CPU, peak RSS, GPU."""
    rows = read_monitor(path)
    lines = [
        "### Training monitor",
        "",
        f"Per-step numbers and resource samples: `{path.name}` "
        "(loss and grad norm at the logging interval; CPU % of this process, 100 = one core).",
        "",
        "| phase | steps | median step s | median tokens/s | mean CPU % | peak RSS MB | "
        "peak GPU MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in dict.fromkeys(r["phase"] for r in rows):
        mine = [r for r in rows if r["phase"] == phase]
        steps = [r for r in mine if r["kind"] == "step"]
        system = [r for r in mine if r["kind"] == "system"]
        cpu = [r["cpu_percent"] for r in system[1:]]  # the first sample has no interval
        gpu = [v for r in system for k, v in r.items() if k.endswith("_peak_mb")]
        lines.append(
            f"| {phase} | {len(steps)} | "
            f"{_fmt(_median([r['step_time_s'] for r in steps]), '.3f')} | "
            f"{_fmt(_median([r['tokens_per_s'] for r in steps if r['tokens_per_s']]), ',.0f')} | "
            f"{_fmt(statistics.fmean(cpu) if cpu else None, '.0f')} | "
            f"{_fmt(max((r['rss_mb'] for r in system), default=None), ',.0f')} | "
            f"{_fmt(max(gpu, default=None), ',.0f')} |"
        )
    lines.append("")
    lines += [f"![monitor]({p.parent.name}/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


class MonitoredTrainer(Trainer):
    """``transformers.Trainer`` with a :class:`TrainingMonitor` attached.

    Counts the non-padding ``input_ids`` of every micro-batch for tokens/s.

    Args:
        monitor: the monitor to attach; default: one writing into ``<output_dir>/monitor``.
        *args, **kwargs: as for ``Trainer``.
    """

    def __init__(self, *args: Any, monitor: TrainingMonitor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor or TrainingMonitor(Path(self.args.output_dir or ".") / "monitor")
        self.add_callback(self.monitor)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        if mask is not None:
            self.monitor.counted_tokens += int(mask.sum())
        elif ids is not None:
            self.monitor.counted_tokens += ids.numel()
        return super().training_step(model, inputs, *args, **kw)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self.monitor.close()
