"""ONNX export of encoders and causal LMs, ONNX Runtime graph optimisation, parity checks.

Every export is checked against the PyTorch reference with a stated tolerance
and *all* mismatches are reported at once (optimum's ``validate_model_outputs``
pattern): each input case x each graph output gets one :class:`OutputCheck`.

Causal LMs are exported **without a KV cache**: the graph maps
``(input_ids, attention_mask)`` to ``logits`` for the whole sequence, which
serves scoring and batch embedding/perplexity; step-by-step generation through
ONNX Runtime would recompute the prefix every token. For generation,
:func:`modelkiln.kvgraph.export_kv_onnx` writes a graph with
past / present key-value tensors.

Example:
    >>> names = export_onnx(model, spec, Path("out/model.onnx"))
    >>> report = validate_onnx(model, Path("out/model.onnx"), batches, atol=1e-4, rtol=1e-3)
    >>> report.ok, report.summary()
    (True, 'all 4 checks within atol=1e-04, rtol=1e-03')
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ArtifactError
from modelkiln.onnxexport import export_guard
from modelkiln.optimize.config import Tolerance

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.runners import ModelInfo

Batch = dict[str, "torch.Tensor"]
FUSION_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "gpt2": "gpt2"}
"""HF model_type -> onnxruntime.transformers fusion family."""
SNR_CAP_DB = 200.0


@dataclass
class OutputCheck:
    """One output on one input case: how far it is from the reference."""

    case: str
    output: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    snr_db: float
    n_bad: int
    n_total: int
    ok: bool
    note: str = ""

    def line(self) -> str:
        """One human-readable line."""
        what = f"{self.output} on {self.case}"
        if self.note:
            return f"{what}: {self.note}"
        return (
            f"{what}: max abs {self.max_abs:.3g}, SNR {self.snr_db:.1f} dB, "
            f"{self.n_bad}/{self.n_total} elements out of tolerance"
        )


@dataclass
class ParityReport:
    """Every output check of a variant or export against the reference."""

    tolerance: Tolerance
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed (and there was at least one)."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[OutputCheck]:
        """The failing checks, all of them."""
        return [c for c in self.checks if not c.ok]

    @property
    def worst_snr_db(self) -> float:
        """The lowest SNR over all checks."""
        return min((c.snr_db for c in self.checks), default=0.0)

    @property
    def max_abs(self) -> float:
        """The largest absolute difference over all checks."""
        return max((c.max_abs for c in self.checks), default=0.0)

    def summary(self) -> str:
        """One line when all pass, else one line per mismatch."""
        tol = self.tolerance.describe()
        if self.ok:
            return f"all {len(self.checks)} checks within {tol}"
        bad = self.mismatches or []
        head = f"{len(bad)} of {len(self.checks)} checks outside {tol}:"
        return "\n".join([head, *(f"  - {c.line()}" for c in bad)])

    def raise_if_failed(self, what: str) -> None:
        """Raise :class:`ArtifactError` naming every mismatch at once."""
        if not self.ok:
            raise ArtifactError(
                f"{what} does not match the reference: {self.summary()}",
                hint="loosen its tolerance only if the quality gate still passes",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tolerance": self.tolerance.model_dump(),
            "ok": self.ok,
            "worst_snr_db": self.worst_snr_db,
            "max_abs": self.max_abs,
            "checks": [asdict(c) for c in self.checks],
        }


def case_name(batch: Batch) -> str:
    """``BxT`` plus ``+pad`` when the mask has zeros."""
    ids = batch["input_ids"]
    padded = "attention_mask" in batch and bool((batch["attention_mask"] == 0).any())
    return f"{ids.shape[0]}x{ids.shape[1]}" + ("+pad" if padded else "")


def compare_outputs(
    case: str,
    name: str,
    ref: torch.Tensor,
    got: torch.Tensor | None,
    tol: Tolerance,
    mask: torch.Tensor | None = None,
) -> OutputCheck:
    """Compare one output; positions where ``mask == 0`` (padding) are not compared."""
    import torch

    shape = list(ref.shape)
    if got is None:
        return OutputCheck(case, name, shape, math.inf, math.inf, 0.0, 0, 0, False, "missing")
    if tuple(got.shape) != tuple(ref.shape):
        note = f"shape {list(got.shape)} != reference {shape}"
        return OutputCheck(case, name, shape, math.inf, math.inf, 0.0, 0, 0, False, note)
    ref, got = ref.detach().float(), got.detach().float()
    if mask is not None and tuple(mask.shape) == tuple(ref.shape[:2]) and ref.dim() >= 2:
        keep = mask.bool()
        ref, got = ref[keep], got[keep]
    if not bool(torch.isfinite(got).all()):
        return OutputCheck(case, name, shape, math.inf, math.inf, 0.0, 0, 0, False, "NaN or inf")
    diff = (got - ref).abs()
    noise = float(diff.pow(2).sum())
    signal = float(ref.pow(2).sum())
    snr = SNR_CAP_DB if noise == 0 else min(SNR_CAP_DB, 10 * math.log10(max(signal, 1e-30) / noise))
    n_bad = 0
    if tol.atol is not None:
        n_bad = int((diff > tol.atol + tol.rtol * ref.abs()).sum())
    ok = n_bad == 0 and (tol.min_snr_db is None or snr >= tol.min_snr_db)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    return OutputCheck(case, name, shape, max_abs, mean_abs, snr, n_bad, diff.numel(), ok)


def check_parity(
    reference: Callable[[Batch], dict[str, torch.Tensor]],
    candidate: Callable[[Batch], dict[str, torch.Tensor]],
    inputs: Sequence[Batch],
    tol: Tolerance,
) -> ParityReport:
    """Run both on every input; compare every reference output; keep every result."""
    report = ParityReport(tol)
    for batch in inputs:
        ref, got, case = reference(batch), candidate(batch), case_name(batch)
        mask = batch.get("attention_mask")
        for name, value in ref.items():
            report.checks.append(compare_outputs(case, name, value, got.get(name), tol, mask))
    return report


def export_outputs(model: torch.nn.Module, spec: ModelInfo) -> list[str]:
    """Graph output names: ``logits`` (causal LM) or ``last_hidden_state`` [+ ``pooler_output``]."""
    if spec.task == "causal-lm":
        return ["logits"]
    import torch

    from modelkiln.optimize.runners import synthetic_batch

    with torch.inference_mode():
        out = model(**synthetic_batch(spec, 1, 4))
    return [n for n in ("last_hidden_state", "pooler_output") if out.get(n) is not None]


class _ExportWrapper:
    """Builds a positional-input module around an HF model (made lazily: torch import)."""

    @staticmethod
    def make(model: torch.nn.Module, spec: ModelInfo, names: list[str]) -> torch.nn.Module:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
                feed = dict(zip(spec.input_names, inputs, strict=True))
                if spec.task == "causal-lm":
                    return (self.model(**feed, use_cache=False).logits,)
                out = self.model(**feed)
                return tuple(out[n] for n in names)

        # A new module is in training mode, and the exporter restores that mode on
        # the wrapped model afterwards (dropout on!): keep everything in eval.
        return Wrapper().eval()


def export_onnx(
    model: torch.nn.Module,
    spec: ModelInfo,
    path: Path,
    *,
    opset: int = 17,
    exporter: str = "torchscript",
) -> list[str]:
    """Export ``model`` (fp32, eval) to ``path`` with dynamic batch and sequence axes.

    The example input has a padded row, so the attention-mask path is traced
    (an all-ones mask lets transformers skip it). Returns the output names.

    Raises:
        StageError: the exporter cannot handle this architecture (one line naming it).
    """
    import torch

    from modelkiln.optimize.runners import synthetic_batch

    what = f"ONNX export cannot handle {spec.architecture}"
    hint = "drop the onnx-* methods for this model and use torch-fp32 / torch-int8-dynamic"
    path.parent.mkdir(parents=True, exist_ok=True)
    with export_guard(model, what, hint=hint):
        names = export_outputs(model, spec)
        example = synthetic_batch(spec, 2, 16, seed=1, pad_last=True)
        args = tuple(example[n] for n in spec.input_names)
        kwargs = _dynamic_kwargs(spec, names, exporter) | {"opset_version": opset}
        torch.onnx.export(
            _ExportWrapper.make(model, spec, names),
            args,
            str(path),
            input_names=list(spec.input_names),
            output_names=names,
            **kwargs,
        )
    return names


def _dynamic_kwargs(spec: ModelInfo, names: list[str], exporter: str) -> dict[str, Any]:
    """Dynamic batch / sequence axes in the form each torch.onnx exporter takes."""
    import torch

    if exporter == "dynamo":
        dim = torch.export.Dim.DYNAMIC
        # One entry: the wrapper's ``*inputs`` is a single (tuple) argument to torch.export.
        shapes = (tuple({0: dim, 1: dim} for _ in spec.input_names),)
        return {"dynamo": True, "dynamic_shapes": shapes}
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in spec.input_names}
    for n in names:
        axes[n] = {0: "batch"} if n == "pooler_output" else {0: "batch", 1: "sequence"}
    return {"dynamo": False, "dynamic_axes": axes}


def optimize_graph(src: Path, dst: Path, spec: ModelInfo, level: str = "fusion") -> str:
    """Write an ONNX Runtime-optimised copy of ``src`` to ``dst``; return what was done.

    ``fusion`` uses onnxruntime.transformers' fusions (attention, skip layer
    norm, GELU) for BERT- and GPT-2-like graphs; other graphs, and ``basic``,
    get ORT's hardware-independent basic optimisations.
    """
    if level == "none":
        shutil.copyfile(src, dst)
        return "none"
    family = FUSION_TYPES.get(spec.model_type)
    if level == "fusion" and family is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(
            str(src),
            model_type=family,
            num_heads=spec.num_heads,
            hidden_size=spec.hidden_size,
            opt_level=0,
        )
        optimized.save_model_to_file(str(dst))
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        return f"fusion:{family} " + ", ".join(f"{k} x{v}" for k, v in sorted(fused.items()))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return "ort-basic"


def torch_outputs(model: torch.nn.Module, names: Sequence[str]) -> Callable[[Batch], dict]:
    """A reference function: the HF model's outputs ``names`` for a batch (no KV cache)."""
    import torch

    causal = "logits" in names

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = model(**batch, use_cache=False) if causal else model(**batch)
        return {n: out[n].float() for n in names if out.get(n) is not None}

    return run


def validate_onnx(
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: Batch | Sequence[Batch],
    atol: float | None = 1e-4,
    rtol: float = 1e-3,
    *,
    min_snr_db: float | None = None,
) -> ParityReport:
    """Check an ONNX graph against its PyTorch model on every input and every output.

    Args:
        model: the reference HF model (put in eval mode here).
        onnx_path: the graph; its output names must be the model's output names.
        inputs: one batch or several (mix shapes, and pad a row, to test dynamic axes).
        atol, rtol, min_snr_db: the tolerance (see :class:`~modelkiln.optimize.config.Tolerance`).

    Returns:
        A report listing every (input case, output) check; ``report.ok`` is the verdict.
    """
    model.eval()
    batches = [inputs] if isinstance(inputs, dict) else list(inputs)
    tol = Tolerance(atol=atol, rtol=rtol, min_snr_db=min_snr_db)
    names, session = ort_outputs(onnx_path)
    return check_parity(torch_outputs(model, names), session, batches, tol)


def ort_outputs(onnx_path: Path) -> tuple[list[str], Callable[[Batch], dict]]:
    """(output names, a function running the graph on a batch -> outputs by name)."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        # A tokenizer may not return every graph input (token_type_ids): fill the default,
        # as the model's own forward does.
        from modelkiln.optimize.runners import _default_input

        full = {k: batch.get(k) for k in inputs}
        ids = batch["input_ids"]
        feed = {k: (v if v is not None else _default_input(k, ids)).cpu().numpy()
                for k, v in full.items()}  # fmt: skip
        return {n: torch.from_numpy(o) for n, o in zip(names, session.run(None, feed), strict=True)}

    return names, run
