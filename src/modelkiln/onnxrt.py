"""The one way modelkiln opens an ONNX Runtime session on the CPU.

Kept free of torch and transformers imports: the serving path of an ONNX model
must not pay for them (cold start).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort


def cpu_session(
    path: str | Path | bytes,
    threads: int | None = None,
    external_data: Mapping[str, bytes] | None = None,
) -> ort.InferenceSession:
    """A CPU session: every graph optimization, sequential operators, non-spinning threads.

    ``path`` may be the serialized graph itself (bytes, e.g. decrypted in memory), with
    ``external_data`` holding its external-data files by the names the graph references:
    nothing is read from or written to disk then.

    ``threads`` sets the intra-op pool (None: ONNX Runtime's default, one per core).
    ORT's pool spins after each run by default; on a 2-core CPU the spinning
    threads steal the cores that whatever runs next needs — the torch variant
    timed next to it (torch-fp32 at batch 1 measured 4x slower after an ORT run),
    or the server's event loop between two engine steps.

    Raises:
        ImportError: onnxruntime is not installed.
        Exception: whatever onnxruntime raises for an unreadable graph.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external_data:
        names = list(external_data)
        options.add_external_initializers_from_files_in_memory(
            names, [external_data[n] for n in names], [len(external_data[n]) for n in names]
        )
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
