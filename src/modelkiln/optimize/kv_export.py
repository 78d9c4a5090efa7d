"""The KV-cache graph inside an optimize variant (the mechanism is :mod:`modelkiln.kvgraph`).

Every ONNX variant of a causal LM also ships ``model_kv.onnx`` when
``quant.kv_cache`` is on; :func:`write_kv_graph` exports it from the variant's
reference model and quantizes it like the variant's cache-free graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.kvgraph import (
    KV_ONNX,
    CacheShape,
    KvParityReport,
    OrtKvGenerator,
    cache_shape,
    check_kv_parity,
    export_kv_onnx,
    kv_input_names,
    kv_output_names,
    kv_parity_prompts,
    positions_from_mask,
)

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.registry import BuildContext

# The graph's mechanism moved to the core module; these names stay importable from here.
__all__ = [
    "KV_ONNX",
    "CacheShape",
    "KvParityReport",
    "OrtKvGenerator",
    "cache_shape",
    "check_kv_parity",
    "export_kv_onnx",
    "kv_input_names",
    "kv_output_names",
    "kv_parity_prompts",
    "positions_from_mask",
    "write_kv_graph",
]


def write_kv_graph(
    ctx: BuildContext,
    out: Path,
    transform: Callable[[Path, Path], object] | None = None,
    model: torch.nn.Module | None = None,
) -> bool:
    """Also write ``out/model_kv.onnx`` for a causal LM when ``quant.kv_cache`` is on.

    ``transform(src, dst)`` quantizes the fp32 KV graph ``src`` into ``dst``
    (None: keep it fp32); ``model`` is the module to export (default: the
    reference; QAT passes its fine-tuned one). Returns whether a KV graph was
    written. An architecture the exporter cannot trace with a cache raises
    ``StageError``.
    """
    import shutil
    import tempfile

    if ctx.spec.task != "causal-lm" or not ctx.cfg.quant.kv_cache:
        return False
    with tempfile.TemporaryDirectory(prefix="kiln-kv-") as tmp:
        raw = Path(tmp) / KV_ONNX
        source = ctx.reference if model is None else model
        export_kv_onnx(source, ctx.spec, raw, opset=ctx.cfg.onnx.opset)
        if transform is None:
            shutil.copyfile(raw, out / KV_ONNX)
        else:
            transform(raw, out / KV_ONNX)
    return True
