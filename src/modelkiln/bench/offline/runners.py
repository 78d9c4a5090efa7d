"""The backends a model directory can be timed on: torch (Hugging Face weights), ONNX Runtime.

A *runner* takes a batch of synthetic inputs of a shape and runs one forward
pass. The inputs are built once per shape (random token ids, full attention
mask), so only the forward pass is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.contract import MODEL_ONNX
from modelkiln.errors import ArtifactError, ConfigError

BACKENDS: tuple[str, ...] = ("torch", "onnx")


@dataclass
class Runner:
    """One backend of one model: ``make(batch, seq)`` builds inputs, ``run(inputs)`` times."""

    name: str
    make: Callable[[int, int], Any]
    run: Callable[[Any], Any]
    vocab_size: int
    max_positions: int | None
    sync: Callable[[], None] | None = None
    module: Any = None  # the torch module (torch backends), for profiling


def _has_torch_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def available_backends(path: Path) -> list[str]:
    """The backends ``path`` holds weights for (torch first)."""
    out = []
    if (path / "config.json").is_file() and _has_torch_weights(path):
        out.append("torch")
    if (path / MODEL_ONNX).is_file():
        out.append("onnx")
    return out


def _torch_runner(path: Path, threads: int | None) -> Runner:
    import torch

    from modelkiln.contract.hfmodel import inspect_model, load_torch_model

    if threads:
        torch.set_num_threads(threads)
    spec = inspect_model(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_torch_model(spec)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to oddly
    vocab = spec.vocab_size

    def make(batch: int, seq: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(batch * 1000 + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run(inputs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model(**inputs)

    sync = torch.cuda.synchronize if device == "cuda" else None
    name = f"torch-{device}" if device != "cpu" else "torch"
    return Runner(name, make, run, vocab, spec.max_positions, sync, model)


def _vocab_of(path: Path) -> tuple[int, int | None]:
    import json

    cfg = path / "config.json"
    if not cfg.is_file():
        return 100, None  # token ids below 100 exist in every vocabulary
    data = json.loads(cfg.read_text())
    text = data.get("text_config") or data
    pos = text.get("max_position_embeddings") or text.get("n_positions")
    return int(text.get("vocab_size", 100)), pos


def _onnx_runner(path: Path, threads: int | None) -> Runner:
    import numpy as np

    from modelkiln.onnxrt import cpu_session

    session = cpu_session(path / MODEL_ONNX, threads)
    names = [i.name for i in session.get_inputs()]
    known = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ArtifactError(
            f"{path / MODEL_ONNX} needs inputs {unknown} that a sweep cannot make",
            hint="time a model whose graph takes input_ids / attention_mask",
        )
    vocab, max_pos = _vocab_of(path)

    def make(batch: int, seq: int) -> dict[str, Any]:
        rng = np.random.default_rng(batch * 1000 + seq)
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)),
        }
        return {n: np.ascontiguousarray(feeds[n]) for n in names}

    def run(inputs: dict[str, Any]) -> Any:
        return session.run(None, inputs)

    return Runner("onnx", make, run, vocab, max_pos)


def load_runners(
    model: str | Path, backends: list[str] | None, threads: int | None
) -> list[Runner]:
    """Runners for ``model`` (a model or variant directory), one per requested backend.

    Raises:
        ArtifactError: the directory holds no weights a backend can run.
        ConfigError: a requested backend is unknown or has no weights there.
    """
    path = Path(model)
    if not path.is_dir():
        raise ArtifactError(
            f"model directory not found: {path}",
            hint="pass a save_pretrained() directory or an optimize variant dir",
        )
    have = available_backends(path)
    if not have and (path / "variant.json").is_file():
        import json

        info = json.loads((path / "variant.json").read_text())
        raise ArtifactError(
            f"variant {info.get('variant')!r} in {path} stores its weights in a form kiln bench "
            f"cannot load yet (backend {info.get('backend')!r})",
            hint="bench its ONNX or fp32 sibling, or the source model (kiln optimize times "
            "every variant itself)",
        )
    if not have:
        raise ArtifactError(
            f"{path} holds neither Hugging Face weights nor {MODEL_ONNX}",
            hint="pass a save_pretrained() directory or an optimize variant dir",
        )
    wanted = backends or have
    for b in wanted:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}", hint=f"one of {', '.join(BACKENDS)}")
        if b not in have:
            raise ConfigError(
                f"{path} has no weights for backend {b!r} (it has {have})",
                hint=f"use --backend {have[0]}",
            )
    make = {"torch": _torch_runner, "onnx": _onnx_runner}
    return [make[b](path, threads) for b in wanted]
