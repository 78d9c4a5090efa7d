"""``kiln profile``: where a model's time and memory go, or a running server's CPU.

- torch models: a torch.profiler Chrome trace (opens in Perfetto), the top ops by
  self time, and the training-memory analysis (:mod:`.memory`);
- ONNX Runtime variants: ORT's own profiler (:mod:`.ort`);
- a running server: a py-spy flame graph (:mod:`.pyspy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkiln.errors import ConfigError

__all__ = ["profile_model", "profile_server"]


def profile_model(
    model: str | Path,
    out: Path,
    *,
    batch: int = 4,
    seq: int = 64,
    steps: int = 3,
    top: int = 15,
    backend: str | None = None,
    memory: bool = True,
) -> dict[str, Any]:
    """Profile ``model`` (a model or variant directory) at ``batch`` x ``seq``.

    Writes ``out/trace.json`` and ``out/profile.json``; returns the latter's content.

    Raises:
        ArtifactError: no weights there. ConfigError: a backend it has no weights for.
    """
    from modelkiln.bench.offline.runners import available_backends, load_runners

    path = Path(model)
    out.mkdir(parents=True, exist_ok=True)
    runner = load_runners(path, [backend] if backend else None, threads=None)[0]
    if runner.max_positions and seq > runner.max_positions:
        raise ConfigError(
            f"--seq {seq} exceeds the model's {runner.max_positions} positions",
            hint=f"use --seq {runner.max_positions} or less",
        )
    inputs = runner.make(batch, seq)
    result: dict[str, Any] = {
        "model": str(path),
        "backend": runner.name,
        "variant": runner.meta,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "available": available_backends(path),
    }
    if runner.name == "onnx":
        from modelkiln.bench.profiling.ort import ort_trace

        assert runner.loaded is not None and runner.loaded.onnx_path is not None  # ONNX runner
        result |= ort_trace(runner.loaded.onnx_path, inputs, out, steps, top)
    else:
        from modelkiln.bench.profiling.torch_trace import torch_trace

        on_cuda = runner.meta.get("device") == "cuda"
        result |= torch_trace(runner.run, inputs, out, steps, top, cuda=on_cuda)
        if memory:
            result["memory"] = _memory(runner, inputs)
    (out / "profile.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _memory(runner: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The training-memory analysis, for formats that can train (plain HF weights)."""
    fmt = runner.meta.get("format")
    if fmt != "hf" or runner.module is None:
        return {
            "skipped": f"format {fmt!r} ({runner.meta.get('variant')}) does not train: "
            "torchao int8 tensors, TorchScript and torch.export programs run inference only; "
            "analyse the fp32 source model instead"
        }
    from modelkiln.bench.profiling.memory import memory_analysis

    return memory_analysis(runner.module, inputs)


def profile_server(
    url: str | None,
    out: Path,
    *,
    seconds: float = 10.0,
    pid: int | None = None,
    idle: bool = False,
) -> Path:
    """Sample the server behind ``url`` (or process ``pid``) with py-spy; the SVG's path.

    ``idle`` includes threads that wait (else an idle server has nothing to show)."""
    from modelkiln.bench.profiling.pyspy import flame_graph, server_pid

    if pid is None and url is None:
        raise ConfigError("give a server URL or a process id", hint="e.g. --pid 1234")
    target = pid if pid is not None else server_pid(str(url))
    return flame_graph(target, out, seconds, idle=idle)
