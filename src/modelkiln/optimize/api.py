"""Library entry point :func:`optimize` and the handbook facade :class:`ModelOptimizer`.

``optimize`` builds every candidate variant from an HF model directory,
checks each against the fp32 reference (parity), benchmarks them side by side,
measures quality on held-out data, gates them, promotes one, and writes::

    <out>/variants/<name>/   each variant: model files, variant.json, eval_card.json
                             (+ layer_error.{json,md} for int8 variants)
    <out>/model/             a copy of the promoted variant (absent if none passed)
    <out>/report.md          the comparison table, auto's decisions, skipped variants
    <out>/comparison.png     latency and quality-ratio plots
    <out>/optimize.json      machine-readable summary

Example:
    >>> metric = code_search_metric(docs, codes, tokenizer)
    >>> result = optimize("runs/q/train/model", OptimizeConfig(), metric, "runs/q/optimize")
    >>> result.chosen, result.cards[result.chosen].speedup
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ConfigError, KilnError
from modelkiln.optimize.auto import Decision, choose, speedups
from modelkiln.optimize.bench import Timing, benchmark, torch_threads
from modelkiln.optimize.config import OptimizeConfig
from modelkiln.optimize.export import ParityReport, check_parity, torch_outputs
from modelkiln.optimize.gate import (
    EvalCard,
    QualityMetric,
    as_metric,
    dir_size,
    enforce,
    judge,
    machine_info,
)
from modelkiln.optimize.registry import VARIANTS, BuildContext, Variant
from modelkiln.optimize.report import compare_models, plot_comparison
from modelkiln.progress import QUIET, Progress

if TYPE_CHECKING:
    from modelkiln.optimize.runners import ModelInfo, Runner

EvalFn = QualityMetric | Callable[["Runner"], float]


@dataclass
class OptimizeResult:
    """What :func:`optimize` did; every card is also on disk."""

    out_dir: Path
    chosen: str | None
    model_dir: Path | None
    cards: dict[str, EvalCard]
    decision: Decision | None
    skipped: dict[str, str] = field(default_factory=dict)
    report_path: Path | None = None
    plot_path: Path | None = None
    table: str = ""


@dataclass
class BuiltVariant:
    """A built variant: its directory, a loaded runner, build facts and parity."""

    variant: Variant
    path: Path
    runner: Runner
    info: dict[str, Any]
    parity: ParityReport


def select_variants(spec: ModelInfo, cfg: OptimizeConfig) -> tuple[list[str], dict[str, str], bool]:
    """(names to build, baseline first; skipped name -> reason; whether the user named them).

    Raises:
        ConfigError: a named method cannot handle this model.
    """
    explicit = cfg.methods is not None or cfg.target != "auto"
    if cfg.target != "auto":
        names = [cfg.baseline, cfg.target]
    else:
        names = list(cfg.methods) if cfg.methods is not None else VARIANTS.names()
        names = [cfg.baseline] + [n for n in names if n != cfg.baseline]
    chosen, skipped = [], {}
    for name in dict.fromkeys(names):
        variant = VARIANTS.get(name)()
        reason = variant.unsupported(spec)
        if reason and explicit:
            raise ConfigError(
                f"{name} cannot optimize {spec.architecture}: {reason}",
                hint="remove it from optimize.methods",
            )
        reason = reason or (None if explicit else variant.not_default_here())
        if reason and name != cfg.baseline:
            skipped[name] = reason
        else:
            chosen.append(name)
    return chosen, skipped, explicit


def build_variant(
    name: str, ctx: BuildContext, out: Path, parity_inputs: list[dict[str, Any]]
) -> BuiltVariant:
    """Build variant ``name`` into ``out`` (replaced), load it, check it against the reference."""
    from modelkiln.optimize.runners import write_variant_json

    variant = VARIANTS.get(name)()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    info = variant.build(ctx, out)
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    write_variant_json(
        out,
        {
            "variant": name,
            "task": ctx.spec.task,
            "backend": variant.backend,
            "family": variant.family,
            "source": str(ctx.spec.path),
            **info,
        },
    )
    runner = variant.load(out, ctx.cfg.bench.threads)
    main = "logits" if ctx.spec.task == "causal-lm" else "last_hidden_state"
    tol = ctx.cfg.tolerances.get(name, variant.tolerance)
    parity = check_parity(
        torch_outputs(variant.parity_reference(ctx), [main]),
        lambda b: {main: runner(**b).main},
        parity_inputs,
        tol,
    )
    return BuiltVariant(variant, out, runner, info, parity)


def _build_all(
    names: list[str], ctx: BuildContext, out: Path, explicit: bool, progress: Progress
) -> tuple[dict[str, BuiltVariant], dict[str, EvalCard]]:
    from modelkiln.optimize.runners import synthetic_batch

    spec, seed = ctx.spec, ctx.cfg.seed
    parity_inputs = [
        *ctx.samples,
        synthetic_batch(spec, 1, 8, seed=seed),
        synthetic_batch(spec, 3, 16, seed=seed + 1, pad_last=True),
    ]
    built: dict[str, BuiltVariant] = {}
    failed: dict[str, EvalCard] = {}
    for name in progress.track(names, "build variants"):
        try:
            built[name] = build_variant(name, ctx, out / "variants" / name, parity_inputs)
        except KilnError as exc:
            if explicit or name == ctx.cfg.baseline:
                raise
            cls = VARIANTS.get(name)
            failed[name] = EvalCard(
                name, cls.family, cls.backend, cls.summary, "failed", [str(exc)]
            )
            progress.message(f"{name}: failed to build ({exc})")
    return built, failed


def _card(name: str, b: BuiltVariant, timings: list[Timing], machine: dict[str, Any]) -> EvalCard:
    parity = b.parity.to_dict() | {"summary": b.parity.summary()}
    return EvalCard(
        variant=name,
        family=b.variant.family,
        backend=b.variant.backend,
        summary=b.variant.summary,
        status="baseline" if b.variant.family == "baseline" else "passed",
        parity=parity,
        size_bytes=dir_size(b.path),
        latency=[t.to_dict() for t in timings],
        build=b.info,
        machine=machine,
        path=str(b.path),
    )


def _measure_quality(
    cards: dict[str, EvalCard],
    built: dict[str, BuiltVariant],
    metric: QualityMetric,
    cfg: OptimizeConfig,
    progress: Progress,
) -> None:
    progress.message(f"quality of {cfg.baseline} ({metric.name})")
    base_value = metric(built[cfg.baseline].runner)
    for name, b in progress.track(list(built.items()), "measure quality"):
        card = cards[name]
        stopped = [t["aborted"] for t in card.latency if t.get("aborted")]
        slow_ok = cfg.target == name or cfg.gate.evaluate_slow
        if stopped and not slow_ok:
            card.status, card.reasons = "skipped", [f"not gated: {stopped[0]}"]
            continue
        if name != cfg.baseline:
            progress.message(f"quality of {name} ({metric.name})")
        value = base_value if name == cfg.baseline else metric(b.runner)
        card.quality = {
            "metric": metric.name,
            "value": value,
            "baseline": base_value,
            "ratio": metric.ratio(value, base_value),
            "higher_is_better": metric.higher_is_better,
            "threshold": cfg.gate.threshold(b.variant.family),
        }


def _call(runner: Runner) -> Callable[[dict[str, Any]], Any]:
    return lambda batch: runner(**batch)


def _gate(cards: dict[str, EvalCard], cfg: OptimizeConfig) -> None:
    for card in cards.values():
        if card.status != "passed":
            continue
        family = VARIANTS.get(card.variant).family
        reasons = judge(card, cfg.gate.threshold(family), require_parity=cfg.gate.require_parity)
        if reasons:
            card.status, card.reasons = "rejected", reasons


def optimize(
    model_dir: str | Path,
    cfg: OptimizeConfig | None,
    eval_fn: EvalFn,
    out_dir: str | Path,
    progress: Progress = QUIET,
    train_batches: list[dict[str, Any]] | None = None,
) -> OptimizeResult:
    """Build, check, benchmark, gate and promote optimized variants of an HF model directory.

    Args:
        model_dir: an encoder or causal-LM directory (``save_pretrained`` layout).
        cfg: the optimize config (None: defaults).
        eval_fn: quality on held-out data, a :class:`QualityMetric` (see
            :func:`~modelkiln.optimize.gate.code_search_metric`) or ``runner -> float``
            (higher is better).
        out_dir: where variants, cards and the report go.
        progress: progress sink.
        train_batches: tokenized training batches for methods that train (pruning recovery,
            distillation, QAT); never the held-out data ``eval_fn`` measures on.

    Raises:
        QualityGateError: ``target`` names a variant and it fails the gate (its card is
            written with ``status: rejected`` and nothing is promoted).
        ConfigError / StageError: a named method cannot handle the model.
    """
    import torch

    from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch

    cfg = cfg or OptimizeConfig()
    metric, out = as_metric(eval_fn), Path(out_dir)
    spec = inspect_model(model_dir, cfg.task)
    names, skipped, explicit = select_variants(spec, cfg)
    for stale in ("model", "variants"):  # this function's own outputs from an earlier run
        shutil.rmtree(out / stale, ignore_errors=True)
    torch.manual_seed(cfg.seed)
    reference = load_torch_model(spec)
    samples = metric.samples or [synthetic_batch(spec, 4, 32, seed=cfg.seed, pad_last=True)]
    ctx = BuildContext(spec, reference, cfg, samples, list(train_batches or []))
    with torch_threads(cfg.bench.threads):
        built, failed = _build_all(names, ctx, out, explicit, progress)
        runners = {n: _call(b.runner) for n, b in built.items()}
        make = lambda bs, sl: synthetic_batch(spec, bs, sl, seed=cfg.seed)  # noqa: E731
        timings = benchmark(runners, make, cfg.bench, cfg.baseline, progress)
        machine = machine_info(cfg.bench.threads)
        cards = {n: _card(n, b, timings[n], machine) for n, b in built.items()}
        _measure_quality(cards, built, metric, cfg, progress)
    _gate(cards, cfg)
    for name, up in speedups(cards, cfg.baseline, cfg.bench).items():
        cards[name].speedup = None if up is None else round(up, 4)
    cards |= failed
    return _finish(out, spec, cfg, cards, skipped)


def _finish(
    out: Path,
    spec: ModelInfo,
    cfg: OptimizeConfig,
    cards: dict[str, EvalCard],
    skipped: dict[str, str],
) -> OptimizeResult:
    decision = None
    if cfg.target == "auto":
        decision = choose(cards, cfg.baseline, cfg.bench, min_speedup=cfg.min_speedup)
        chosen: str | None = decision.chosen
        for name, why in decision.considered.items():
            if cards[name].status == "passed":
                cards[name].reasons = [why]
    else:
        chosen = cfg.target if cards[cfg.target].status != "rejected" else None
    if chosen is not None:
        cards[chosen].status = "chosen"
    for name, card in cards.items():
        card.write(out / "variants" / name)
    model_dir = None
    if chosen is not None:
        model_dir = out / "model"
        shutil.copytree(out / "variants" / chosen, model_dir)
    result = OptimizeResult(out, chosen, model_dir, cards, decision, skipped)
    _write_report(result, spec, cfg)
    if cfg.target != "auto":
        enforce(cards[cfg.target])
    return result


def _write_report(result: OptimizeResult, spec: ModelInfo, cfg: OptimizeConfig) -> None:
    out = result.out_dir
    result.table = compare_models(result.cards, cfg.bench, cfg.baseline)
    result.plot_path = plot_comparison(result.cards, cfg.bench, out / "comparison.png")
    machine = next((c.machine for c in result.cards.values() if c.machine), {})
    lines = [
        f"# Optimization of {spec.architecture} ({spec.task})",
        "",
        f"Source: `{spec.path}`; machine: {machine.get('cpu', '?')}, "
        f"{machine.get('threads', '?')} threads, units {machine.get('vector_units', [])}.",
        "",
        result.table,
        f"Promoted: `{result.chosen}`" if result.chosen else "Nothing promoted.",
        "",
    ]
    for name, card in result.cards.items():
        built = (card.build or {}).get("build_seconds")
        took = f", built in {built:.1f} s" if isinstance(built, int | float) else ""
        lines.append(f"- `{name}` ({card.status}{took}): {'; '.join(card.reasons) or card.summary}")
    lines += [f"- `{n}` (not built): {why}" for n, why in result.skipped.items()]
    if result.plot_path:
        lines += ["", f"![comparison]({result.plot_path.name})"]
    result.report_path = out / "report.md"
    result.report_path.write_text("\n".join(lines) + "\n")
    summary = {
        "chosen": result.chosen,
        "decision": result.decision.to_dict() if result.decision else None,
        "skipped": result.skipped,
        "variants": {
            n: {
                "status": c.status,
                "reasons": c.reasons,
                "speedup": c.speedup,
                "quality": c.quality,
                "size_bytes": c.size_bytes,
            }
            for n, c in result.cards.items()
        },
    }
    (out / "optimize.json").write_text(json.dumps(summary, indent=2, default=str))


class ModelOptimizer:
    """The handbook's ``ModelOptimizer``: a thin facade over :func:`optimize`.

    Example:
        >>> opt = ModelOptimizer("runs/q/train/model", metric)
        >>> result = opt.auto("runs/q/optimize")
        >>> print(opt.compare_models(result))
    """

    def __init__(
        self,
        model_dir: str | Path,
        eval_fn: EvalFn,
        cfg: OptimizeConfig | None = None,
        progress: Progress = QUIET,
        train_batches: list[dict[str, Any]] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.eval_fn = eval_fn
        self.cfg = cfg or OptimizeConfig()
        self.progress = progress
        self.train_batches = train_batches

    def auto(self, out_dir: str | Path) -> OptimizeResult:
        """Benchmark the candidates and promote the fastest one that passes the gate."""
        cfg = self.cfg.model_copy(update={"target": "auto"})
        return optimize(
            self.model_dir, cfg, self.eval_fn, out_dir, self.progress, self.train_batches
        )

    def quantize(self, out_dir: str | Path, method: str = "onnx-int8-dynamic") -> OptimizeResult:
        """Build one variant by name; raises QualityGateError if it fails the gate."""
        VARIANTS.get(method)
        cfg = self.cfg.model_copy(update={"target": method})
        return optimize(
            self.model_dir, cfg, self.eval_fn, out_dir, self.progress, self.train_batches
        )

    def export_onnx(self, out_dir: str | Path) -> OptimizeResult:
        """fp32 ONNX export with the parity check (``quantize(method="onnx-fp32")``)."""
        return self.quantize(out_dir, "onnx-fp32")

    @staticmethod
    def compare_models(result: OptimizeResult) -> str:
        """The comparison table of a result (markdown)."""
        return result.table
