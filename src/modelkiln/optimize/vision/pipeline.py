"""The CNN path end to end: train (or load) the digits CNN, build every variant, compare them.

:func:`optimize_cnn` builds fp32, conv-BN fused, ONNX fp32, ONNX static int8, channel-pruned
(+ recovery fine-tune) and distilled variants, saves each under ``out/variants/<name>``,
measures held-out accuracy, artifact size and p50 latency (variants interleaved round by
round, since the machine is shared and noisy) and writes ``out/comparison.md`` and
``out/comparison.json``. :class:`DigitsCNNOptimizer` is the object-style facade.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.contract import MODEL_ONNX
from modelkiln.errors import ConfigError, StageError
from modelkiln.optimize.bench import torch_threads
from modelkiln.optimize.vision.checkpoint import load_module, save_module
from modelkiln.optimize.vision.config import CnnOptimizeConfig
from modelkiln.optimize.vision.model import (
    NUM_CLASSES,
    DigitsCNN,
    DigitsData,
    accuracy,
    eval_mode,
    load_digits_split,
    predict,
    train_classifier,
)
from modelkiln.optimize.vision.onnx_int8 import (
    INPUT,
    OUTPUT,
    export_cnn_onnx,
    ort_logits,
    ort_session,
    quantize_cnn_static,
)
from modelkiln.optimize.vision.transforms import distill, fuse_conv_bn, prune_channels

log = logging.getLogger(__name__)
FUSION_ATOL = 1e-4  # fp32 re-association of the folded scale: differences ~1e-6 on logits


@dataclass
class CnnRow:
    """One variant: accuracy, artifact size, parameters and p50 latency per batch size."""

    name: str
    backend: str
    accuracy: float
    size_bytes: int
    params: int | None
    path: str
    p50_ms: dict[int, float] = field(default_factory=dict)


@dataclass
class CnnResult:
    """Every variant of one run, the markdown table and what each build did."""

    rows: list[CnnRow]
    table: str
    details: dict[str, Any]

    def row(self, name: str) -> CnnRow:
        """The row of variant ``name`` (KeyError if it was not built)."""
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``comparison.json`` holds)."""
        return {"rows": [asdict(r) for r in self.rows], "details": self.details}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _save_torch(model: nn.Module, out: Path) -> Path:
    """A checkpoint directory (importable classes) or a ``torch.export`` .pt2 (fx graphs)."""
    if isinstance(model, torch.fx.GraphModule):
        batch = torch.export.Dim("batch", min=1, max=4096)
        example = (torch.zeros(2, 1, 8, 8),)
        program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        out.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(out / "model.pt2"))
        return out / "model.pt2"
    return save_module(model, out)


def _size(path: Path) -> int:
    """Bytes on disk of a variant (weights and graph; ``module.json`` not counted)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.name != "module.json")


def load_teacher(checkpoint: str | Path, data: DigitsData) -> nn.Module:
    """A plain-module checkpoint that maps (N, 1, 8, 8) images to 10 logits.

    Raises:
        ConfigError: the module does not take digits images or give 10 logits.
    """
    model = load_module(checkpoint)
    try:
        out = predict(model, data.x_test[:2])
    except Exception as exc:  # boundary: any shape / dtype failure of a user's module
        raise ConfigError(
            f"{checkpoint} does not run on (N, 1, 8, 8) digits images: {exc}",
            hint="the CNN path optimizes 8x8 single-channel digit classifiers",
        ) from exc
    if tuple(out.shape) != (2, NUM_CLASSES):
        raise ConfigError(
            f"{checkpoint} gives outputs of shape {tuple(out.shape)}, expected (N, {NUM_CLASSES})",
            hint="the module must return one logit per digit class",
        )
    return model


def optimize_cnn(
    cfg: CnnOptimizeConfig | None = None,
    out: str | Path = "runs/cnn",
    *,
    checkpoint: str | Path | None = None,
) -> CnnResult:
    """Build, check, time and compare every CNN variant; write ``comparison.md`` / ``.json``.

    Args:
        cfg: the settings (defaults when None).
        out: output directory (variants under ``out/variants``).
        checkpoint: a plain-module checkpoint (:func:`~modelkiln.optimize.vision.load_module`)
            to optimize instead of training a :class:`DigitsCNN`.

    Raises:
        StageError: the fused model does not reproduce the fp32 one.
        ConfigError: bad settings or a checkpoint that is no digits classifier.
    """
    cfg = cfg or CnnOptimizeConfig()
    root = Path(out)
    vdir = root / "variants"
    data = load_digits_split(cfg.test_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    details: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        teacher = _teacher(cfg, data, checkpoint, details)
        built = {"fp32": teacher, "fused": _fused(teacher, data, details)}
        pruned = _pruned(teacher, data, cfg, details)
        if pruned is not None:
            built["pruned"] = pruned
        built["distilled"] = _distilled(teacher, data, cfg, details)
        paths = {name: _save_torch(model, vdir / name) for name, model in built.items()}
        paths |= _onnx_variants(teacher, data, cfg, vdir, details)
        # Reload every saved variant: the table describes what is on disk.
        models = {n: load_module(paths[n]) for n in built}
        sessions = {n: ort_session(paths[n], cfg.threads) for n in paths if n not in built}
        runs = {n: _torch_run(m) for n, m in models.items()}
        runs |= {n: _ort_run(s) for n, s in sessions.items()}
        latency = time_variants(runs, data.x_test, cfg)
        rows = []
        for name in runs:
            model = models.get(name)
            logits = (
                predict(model, data.x_test)
                if model is not None
                else ort_logits(sessions[name], data.x_test)
            )
            rows.append(
                CnnRow(
                    name=name,
                    backend="torch" if model is not None else "onnxruntime",
                    accuracy=accuracy(logits, data.y_test),
                    size_bytes=_size(paths[name]),
                    params=_params(model) if model is not None else None,
                    path=str(paths[name]),
                    p50_ms=latency[name],
                )
            )
    table = render_table(rows, cfg.batch_sizes)
    result = CnnResult(rows=rows, table=table, details=details)
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.md").write_text(table, encoding="utf-8")
    (root / "comparison.json").write_text(json.dumps(result.to_dict(), indent=2), "utf-8")
    return result


def _teacher(
    cfg: CnnOptimizeConfig, data: DigitsData, checkpoint: str | Path | None, details: dict[str, Any]
) -> nn.Module:
    """The checkpoint's module, or a freshly trained :class:`DigitsCNN`."""
    if checkpoint is not None:
        details["source"] = str(checkpoint)
        return load_teacher(checkpoint, data)
    teacher = DigitsCNN(cfg.channels)
    started = time.perf_counter()
    train_classifier(
        teacher, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed
    )
    details["train_seconds"] = round(time.perf_counter() - started, 2)
    return teacher


def _fused(teacher: nn.Module, data: DigitsData, details: dict[str, Any]) -> nn.Module:
    """Conv-BN fused copy, checked against the teacher on every held-out image."""
    fused = fuse_conv_bn(teacher)
    diff = float((predict(fused, data.x_test) - predict(teacher, data.x_test)).abs().max())
    details["fusion_max_abs_diff"] = diff
    if diff > FUSION_ATOL:
        raise StageError(
            f"conv-BN fusion changed the logits by {diff:.2e} (tolerance {FUSION_ATOL})",
            hint="fuse only eval-mode models with frozen BatchNorm statistics",
        )
    return fused


def _pruned(
    teacher: nn.Module, data: DigitsData, cfg: CnnOptimizeConfig, details: dict[str, Any]
) -> nn.Module | None:
    """Channel-pruned + fine-tuned copy (None, with the reason, if the layout is unsupported)."""
    batches = list(data.batches(cfg.batch_size, seed=cfg.seed))[: cfg.calibration_batches]
    try:
        pruned, report = prune_channels(teacher, cfg.prune_ratio, cfg.prune_criterion, batches)
    except ConfigError as exc:  # a checkpoint whose layout the pruner cannot follow
        details["pruned"] = {"skipped": str(exc)}
        return None
    acc0 = accuracy(predict(pruned, data.x_test), data.y_test)
    if cfg.finetune_epochs:
        train_classifier(
            pruned,
            data,
            epochs=cfg.finetune_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr / 3,  # recovery: a gentler rate than training from scratch
            seed=cfg.seed + 100,
        )
    details["pruned"] = {
        "widths_before": report.before,
        "widths_after": report.after,
        "criterion": cfg.prune_criterion,
        "accuracy_before_finetune": round(acc0, 4),
    }
    return pruned


def _distilled(
    teacher: nn.Module, data: DigitsData, cfg: CnnOptimizeConfig, details: dict[str, Any]
) -> nn.Module:
    """A fresh :class:`DigitsCNN` of ``student_channels`` trained on the teacher's logits."""
    student = DigitsCNN(cfg.student_channels)
    distill(
        teacher,
        student,
        data,
        epochs=cfg.kd_epochs,
        temperature=cfg.kd_temperature,
        alpha=cfg.kd_alpha,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
    )
    details["distilled"] = {
        "student_channels": cfg.student_channels,
        "temperature": cfg.kd_temperature,
        "alpha": cfg.kd_alpha,
    }
    return student


def _onnx_variants(
    teacher: nn.Module,
    data: DigitsData,
    cfg: CnnOptimizeConfig,
    vdir: Path,
    details: dict[str, Any],
) -> dict[str, Path]:
    """The teacher as ONNX fp32 and as static int8 calibrated on training images."""
    fp32 = export_cnn_onnx(teacher, data.x_test, vdir / "onnx-fp32" / MODEL_ONNX)
    int8 = vdir / "onnx-int8-static" / MODEL_ONNX
    calib = [x for x, _ in data.batches(cfg.batch_size, seed=cfg.seed)]
    rr = None if cfg.reduce_range == "auto" else bool(cfg.reduce_range)
    details["int8"] = quantize_cnn_static(
        fp32, int8, calib[: cfg.calibration_batches], reduce_range=rr
    )
    return {"onnx-fp32": fp32, "onnx-int8-static": int8}


def _torch_run(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    eval_mode(model)

    def run(x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _ort_run(session: Any) -> Callable[[torch.Tensor], Any]:
    def run(x: torch.Tensor) -> Any:
        return session.run([OUTPUT], {INPUT: x.numpy()})

    return run


def time_variants(
    runs: dict[str, Callable[[torch.Tensor], Any]], images: torch.Tensor, cfg: CnnOptimizeConfig
) -> dict[str, dict[int, float]]:
    """p50 ms per call of each variant and batch size; variants interleaved round by round."""
    batches = {b: images[:b].contiguous() for b in cfg.batch_sizes}
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in runs}
    for run in runs.values():  # warm-up: first calls allocate / pick kernels
        for x in batches.values():
            run(x)
    for _ in range(cfg.timing_rounds):
        for name, run in runs.items():
            for b, x in batches.items():
                for _ in range(cfg.timing_calls):
                    start = time.perf_counter()
                    run(x)
                    times[name][b].append((time.perf_counter() - start) * 1000)
    return {n: {b: statistics.median(t) for b, t in per.items()} for n, per in times.items()}


def render_table(rows: list[CnnRow], batch_sizes: list[int]) -> str:
    """Markdown table: accuracy (and change vs fp32), size, params, p50 latency, speedup."""
    base = rows[0]
    head = ["variant", "backend", "accuracy", "Δ acc (pts)", "size KB", "size x", "params"]
    head += [f"p50 ms b{b}" for b in batch_sizes] + [f"speedup b{b}" for b in batch_sizes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r.name}`",
            r.backend,
            f"{r.accuracy:.2%}",
            f"{(r.accuracy - base.accuracy) * 100:+.1f}",
            f"{r.size_bytes / 1024:.1f}",
            f"{base.size_bytes / r.size_bytes:.2f}",
            f"{r.params:,}" if r.params else "—",
        ]
        cells += [f"{r.p50_ms[b]:.3f}" for b in batch_sizes]
        cells += [f"{base.p50_ms[b] / r.p50_ms[b]:.2f}x" for b in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class DigitsCNNOptimizer:
    """Object-style facade over :func:`optimize_cnn`.

    Example:
        >>> opt = DigitsCNNOptimizer(CnnOptimizeConfig(epochs=4))  # doctest: +SKIP
        >>> print(opt.run("runs/cnn").table)  # doctest: +SKIP
    """

    def __init__(self, cfg: CnnOptimizeConfig | None = None) -> None:
        self.cfg = cfg or CnnOptimizeConfig()

    def run(self, out: str | Path, checkpoint: str | Path | None = None) -> CnnResult:
        """Build and compare every variant (see :func:`optimize_cnn`)."""
        return optimize_cnn(self.cfg, out, checkpoint=checkpoint)
