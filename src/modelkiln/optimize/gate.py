"""Quality metrics, eval cards and the quality gate.

Every variant directory gets an ``eval_card.json``: quality on held-out data
and its ratio to the baseline, parity against the fp32 reference, size on
disk, latency / throughput per shape, the machine, and a ``status``:

* ``baseline`` — the reference (torch-fp32);
* ``chosen``   — promoted (copied to ``<out>/model``);
* ``passed``   — passed the gate but was not chosen (``reasons`` say why);
* ``rejected`` — failed the gate (``reasons``); never promoted;
* ``skipped``  — not gated: stopped early as too slow, so ``auto`` could never choose it
  (its parity SNR is still on the card);
* ``failed``   — could not be built on this model (``reasons``).

Example:
    >>> metric = code_search_metric(docstrings, codes, tokenizer)   # MRR@10, higher is better
    >>> metric(runner)
    0.61
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkiln.contract import EVAL_CARD, VARIANT_JSON
from modelkiln.errors import QualityGateError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from modelkiln.optimize.runners import Runner

Status = Literal["baseline", "chosen", "passed", "rejected", "skipped", "failed"]
CARD = EVAL_CARD


@dataclass
class QualityMetric:
    """A quality measurement of a runner on held-out data.

    Attributes:
        name: e.g. ``mrr@10`` or ``perplexity``.
        fn: runner -> value.
        higher_is_better: False for losses / perplexity (the ratio is then baseline / value).
        samples: real tokenized batches, used for parity checks and the per-layer error report.
    """

    name: str
    fn: Callable[[Runner], float]
    higher_is_better: bool = True
    samples: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __call__(self, runner: Runner) -> float:
        """Measure ``runner``."""
        return float(self.fn(runner))

    def ratio(self, value: float, baseline: float) -> float:
        """Quality relative to the baseline, 1.0 = equal, > 1 = better."""
        if self.higher_is_better:
            return value / baseline if baseline else (1.0 if value == baseline else 0.0)
        return baseline / value if value else 0.0


def as_metric(eval_fn: QualityMetric | Callable[[Runner], float]) -> QualityMetric:
    """Wrap a plain callable (higher is better, named ``quality``) as a :class:`QualityMetric`."""
    return eval_fn if isinstance(eval_fn, QualityMetric) else QualityMetric("quality", eval_fn)


def _sample_batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, n: int = 16
) -> list[dict[str, torch.Tensor]]:
    """Two real batches of ``n // 2`` texts each (padded), for parity and layer error."""
    half = max(1, n // 2)
    out = []
    for chunk in (texts[:half], texts[half : 2 * half]):
        if chunk:
            enc = tokenizer(
                chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            out.append(dict(enc))
    return out


def code_search_metric(
    docstrings: list[str],
    codes: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 128,
    batch_size: int = 32,
    k: int = 10,
) -> QualityMetric:
    """MRR@k of each docstring retrieving its own code among all ``codes`` (mean pooling)."""
    from modelkiln.contract.codesearch import evaluate_code_search

    def run(runner: Runner) -> float:
        m = evaluate_code_search(
            runner, tokenizer, docstrings, codes, k, batch_size=batch_size, max_length=max_length
        )
        return float(m[f"mrr@{k}"])

    samples = _sample_batches(tokenizer, docstrings[:8] + codes[:8], max_length)
    return QualityMetric(f"mrr@{k}", run, True, samples)


def perplexity_metric(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 128,
    batch_size: int = 8,
) -> QualityMetric:
    """Token-level perplexity of a causal LM on ``texts`` (lower is better).

    A tokenizer without a pad token gets its EOS token as pad (right padding;
    padded positions are excluded from the loss).
    """
    import math

    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def run(runner: Runner) -> float:
        total, count = 0.0, 0
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = runner(**enc).logits[:, :-1]
            target = enc["input_ids"][:, 1:]
            keep = enc["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total, count = total + float(nll), count + int(keep.sum())
        return math.exp(total / max(count, 1))

    return QualityMetric("perplexity", run, False, _sample_batches(tokenizer, texts, max_length))


@dataclass
class EvalCard:
    """Everything known about one variant; written as ``eval_card.json`` in its directory."""

    variant: str
    family: str
    backend: str
    summary: str
    status: Status = "passed"
    reasons: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    size_bytes: int = 0
    latency: list[dict[str, Any]] = field(default_factory=list)
    speedup: float | None = None
    build: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def write(self, directory: Path) -> Path:
        """Write ``eval_card.json`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CARD
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def read(cls, directory: Path) -> EvalCard:
        """Read the card of a variant directory."""
        return cls(**json.loads((Path(directory) / CARD).read_text()))

    def timing(self, batch: int, seq: int) -> dict[str, Any] | None:
        """The latency entry for one shape."""
        return next((t for t in self.latency if t["batch"] == batch and t["seq"] == seq), None)


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path`` except cards and reports."""
    skip = {CARD, "layer_error.json", "layer_error.md", VARIANT_JSON}
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name not in skip)


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, usable cores, vector units, threads, and library versions."""
    import torch

    from modelkiln.hardware import cpu_class, cpu_has_fast_bf16, precision_decision

    cpu = platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and cpu == platform.machine():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    units = [
        u
        for u in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
        if u in flags
    ]
    versions = {}
    for pkg in ("torch", "transformers", "onnxruntime", "torchao"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "vector_units": units,
        "fast_bf16": cpu_has_fast_bf16(),
        "cpu_class": cpu_class(),
        "precision_auto": precision_decision("auto", "cpu").as_dict(),
        "threads": threads or torch.get_num_threads(),
        "versions": versions,
    }


def judge(card: EvalCard, threshold: float, *, require_parity: bool) -> list[str]:
    """Reasons the card fails the gate (empty: it passes). The baseline always passes."""
    if card.family == "baseline":
        return []
    reasons = []
    quality = card.quality or {}
    ratio = quality.get("ratio")
    if ratio is None:
        reasons.append("quality not measured")
    elif ratio < threshold:
        reasons.append(
            f"quality {quality['metric']} {quality['value']:.4f} is {ratio:.4f} of the baseline's "
            f"{quality['baseline']:.4f} < threshold {threshold}"
        )
    if require_parity and card.parity is not None and not card.parity.get("ok", False):
        reasons.append(f"outputs outside the parity tolerance ({card.parity.get('summary', '')})")
    return reasons


def enforce(card: EvalCard) -> None:
    """Raise :class:`QualityGateError` for a rejected card (it is already on disk)."""
    if card.status == "rejected":
        raise QualityGateError(
            f"{card.variant} failed the quality gate: {'; '.join(card.reasons)} "
            f"(kept as rejected in {card.path})",
            hint="lower the threshold in optimize.gate, or pick another method",
        )
