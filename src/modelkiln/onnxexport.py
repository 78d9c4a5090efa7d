"""The one way an ONNX / torch.export failure becomes a clear error (torch-free to import).

Exporters wrap the real problem in layers of their own exceptions and print
pages of warnings; every exporter call in modelkiln runs inside
:func:`export_guard`, which puts the model in eval mode, silences the
warnings, turns any failure into one :class:`~modelkiln.errors.StageError`
line naming the innermost cause, and restores the model's training mode.

The int8 dynamic quantization of an exported graph lives here too
(:func:`quantize_int8_dynamic`): the optimize stage's ``onnx-int8-dynamic``
variants and the server's first-start engine build call the same function.

Example:
    >>> with export_guard(model, f"ONNX export cannot handle {arch}", hint="use torch-fp32"):
    ...     torch.onnx.export(model, args, "model.onnx")
    >>> quantize_int8_dynamic(Path("model.onnx"), Path("model-int8.onnx"))
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelkiln.errors import StageError

__all__ = [
    "cpu_has_int8_dot",
    "export_guard",
    "quantize_int8_dynamic",
    "quiet_root_logger",
    "root_cause",
]


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost chained exception (exporters wrap the real one)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@contextlib.contextmanager
def export_guard(model: Any, what: str, *, hint: str, cause: bool = True) -> Iterator[None]:
    """Run an export of ``model`` in eval mode, warnings silenced, failures as one ``StageError``.

    Args:
        model: a ``torch.nn.Module`` (its training mode is restored afterwards); None: none.
        what: the message head, e.g. ``"ONNX export cannot handle GPT2LMHeadModel"``.
        hint: the fix the error suggests.
        cause: append ``(Type: first line)`` of the root cause (else ``: message``).

    Raises:
        StageError: the block raised any exception.
    """
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        _set_mode(model, False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:  # boundary: any exporter failure becomes one clear line
        detail = f" ({root_cause(exc)})" if cause else f": {exc}"
        raise StageError(f"{what}{detail}", hint=hint) from exc
    finally:
        if model is not None:
            _set_mode(model, was_training)


def _set_mode(model: Any, training: bool) -> None:
    # nn.Module.train itself: a user module may shadow .train / .eval with its own attribute.
    import torch

    torch.nn.Module.train(model, training)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizers log a 'consider pre-processing' warning on the root logger
    on every call; hold it at ERROR meanwhile (used by the optimize stage and the server's
    first-start engine build)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-int8)."""
    from modelkiln.cpu import cpu_info

    flags = cpu_info().flags
    return any(flags.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_int8_dynamic(
    source: Path, target: Path, *, per_channel: bool = True, reduce_range: bool | None = None
) -> None:
    """ONNX Runtime dynamic int8 of the graph ``source`` into ``target``.

    int8 weights (per output channel when ``per_channel``), uint8 activations
    quantized per call. ``reduce_range`` (7-bit weights) defaults to "the CPU has
    no int8 dot product" (:func:`cpu_has_int8_dot`): without VNNI the u8 x s8
    multiply-adds saturate at 8 bits.

    Raises:
        ImportError: onnxruntime is not installed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce = not cpu_has_int8_dot() if reduce_range is None else reduce_range
    with quiet_root_logger():  # "consider pre-processing" warning on every call
        quantize_dynamic(source, target, per_channel=per_channel, reduce_range=reduce,
                         weight_type=QuantType.QInt8)  # fmt: skip
