"""The backends a model or variant directory can be timed on: torch, ONNX Runtime.

A *runner* takes a batch of synthetic inputs of a shape and runs one forward
pass. The inputs are built once per shape (random token ids, full attention
mask), so only the forward pass is timed. Every format the optimize stage
writes (HF fp32 / bf16, torchao int8, pruned, distilled, TorchScript,
torch.export, ONNX) loads through :mod:`modelkiln.contract.variants`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.contract.variants import LoadedVariant, available_backends, load_variant
from modelkiln.errors import ConfigError

BACKENDS: tuple[str, ...] = ("torch", "onnx")
__all__ = ["BACKENDS", "Runner", "available_backends", "compiled_runner", "load_runners"]


@dataclass
class Runner:
    """One backend of one model: ``make(batch, seq)`` builds inputs, ``run(inputs)`` times."""

    name: str
    make: Callable[[int, int], Any]
    run: Callable[[Any], Any]
    vocab_size: int
    max_positions: int | None
    sync: Callable[[], None] | None = None
    module: Any = None  # the torch module called with keywords (HF formats), for profiling
    loaded: LoadedVariant | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _runner(v: LoadedVariant) -> Runner:
    name = v.backend if v.device == "cpu" else f"{v.backend}-{v.device}"
    return Runner(name, v.make_inputs, v.forward, v.vocab_size, v.max_positions, v.sync,
                  v.module, v, v.describe())  # fmt: skip


def load_runners(
    model: str | Path, backends: list[str] | None, threads: int | None
) -> list[Runner]:
    """Runners for ``model`` (a model or variant directory), one per requested backend.

    Raises:
        ArtifactError: the directory holds no weights a backend can run.
        ConfigError: a requested backend is unknown or has no weights there.
    """
    have = available_backends(model)
    wanted = backends or have
    return [_runner(load_variant(model, backend=b, threads=threads)) for b in wanted]  # type: ignore[arg-type]


def compiled_runner(runner: Runner, backend: str = "inductor") -> Runner:
    """``runner``'s module through ``torch.compile(dynamic=True)`` (the server's ``compile``).

    The first call at each shape compiles (seen in the cell's ``first_call_ms``).

    Raises:
        ConfigError: the runner has no torch module (ONNX, TorchScript, torch.export).
    """
    import torch

    if runner.module is None:
        raise ConfigError(
            f"--compile needs a torch module; format {runner.meta.get('format')!r} has none",
            hint="compile applies to Hugging Face weights (torch fp32 / bf16 / pruned / distilled)",
        )
    compiled = torch.compile(runner.module, dynamic=True, backend=backend)
    extra = {"use_cache": False} if runner.meta.get("task") == "causal-lm" else {}

    def run(feed: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return compiled(**feed, **extra)

    meta = runner.meta | {"compile": f"torch.compile(dynamic=True, backend={backend!r})"}
    r = runner
    return Runner(f"{r.name}-compile", r.make, run, r.vocab_size, r.max_positions, r.sync,
                  r.module, r.loaded, meta)  # fmt: skip
