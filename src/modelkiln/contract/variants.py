"""Load any model or optimize-variant directory as one forward callable plus what it is.

The optimize stage writes each variant in one of a few *formats* (``variant.json``
``format``); this module reads every one of them back without the optimize
stage's code, so the bench and profile commands (and any other stage) can run a
variant through the artifact contract alone:

============== ============================================ ==========================
format         written by                                   loaded with
============== ============================================ ==========================
hf             torch-fp32 / torch-bf16, prune-*, distill-*  ``from_pretrained`` in the
                                                            saved dtype (``dtype``)
hf-torchao     torch-int8-dynamic (``nn.Linear`` models)    ``from_pretrained`` (the
                                                            torchao recipe is in
                                                            config.json)
torchao-linear torch-int8-dynamic (GPT-2 ``Conv1D`` models) ``from_config``, Conv1D ->
                                                            Linear, torchao-flattened
                                                            safetensors
torchscript    torchscript                                  ``torch.jit.load``
torch-export   torch-export                                 ``torch.export.load``
onnx           onnx-fp32, onnx-int8-*, onnx-int4-weight,    ONNX Runtime CPU session
               qat-int8, onnx-tensorrt (graph on the CPU)
============== ============================================ ==========================

A directory without ``variant.json`` is a plain ``save_pretrained`` folder (fp32)
or a folder holding ``model.onnx``. Torch and ONNX Runtime are imported inside the
functions.

Example:
    >>> v = load_variant("runs/q/optimize/variants/torchscript")
    >>> feed = v.make_inputs(8, 128)
    >>> out = v.forward(feed)            # one forward pass, what a benchmark times
    >>> v.main_output(feed).shape        # fp32 numpy, (8, 128, hidden) or (8, 128, vocab)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelkiln.contract import MODEL_DIR, MODEL_ONNX, VARIANT_JSON, read_variant_json
from modelkiln.errors import ArtifactError, ConfigError, DependencyMissingError

__all__ = [
    "FORMATS",
    "LoadedVariant",
    "available_backends",
    "load_torchao_linear",
    "load_variant",
    "resolve_model_dir",
    "swap_conv1d",
    "variant_format",
]

Backend = Literal["torch", "onnx"]
FORMATS: dict[str, Backend] = {
    "hf": "torch",
    "hf-torchao": "torch",
    "torchao-linear": "torch",
    "torchscript": "torch",
    "torch-export": "torch",
    "onnx": "onnx",
}
"""Every format the optimize stage writes -> the backend that runs it."""
PROGRAM_FILES = {"torchscript": "model.pt", "torch-export": "model.pt2"}
TORCHAO_WEIGHTS = "model.safetensors"


@dataclass
class LoadedVariant:
    """A loaded model: ``forward(make_inputs(batch, seq))`` is one forward pass.

    ``module`` is the ``torch.nn.Module`` called with keyword inputs (the ``hf*``
    and ``torchao-linear`` formats), which profilers and memory analysis need;
    None for programs and ONNX graphs.
    """

    path: Path
    variant: str | None
    format: str
    backend: Backend
    task: str
    dtype: str | None
    device: str
    input_names: tuple[str, ...]
    vocab_size: int
    max_positions: int | None
    forward: Callable[[dict[str, Any]], Any]
    make_inputs: Callable[[int, int], dict[str, Any]]
    module: Any = None
    onnx_path: Path | None = None
    sync: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def main_output(self, feed: dict[str, Any]) -> Any:
        """The main output (``last_hidden_state`` / ``logits``) as an fp32 numpy array."""
        return self.main_of(self.forward(feed))

    def main_of(self, out: Any) -> Any:
        """The main output of what :attr:`forward` returned, as an fp32 numpy array."""
        if isinstance(out, list | tuple):
            out = out[0]
        elif not hasattr(out, "shape"):
            out = out.logits if self.task == "causal-lm" else out[0]
        if hasattr(out, "detach"):
            return out.detach().float().cpu().numpy()
        return out.astype("float32")

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: variant, format, backend, task, dtype, device."""
        keys = ("variant", "format", "backend", "task", "dtype", "device")
        return {k: getattr(self, k) for k in keys} | {"path": str(self.path)}


def resolve_model_dir(path: str | Path) -> Path:
    """``path``, or its ``model/`` folder when ``path`` is a stage directory holding one.

    So a train or optimize artifact (``runs/q/train``, ``runs/q/optimize``: the
    trained model, the promoted variant) can be given as is.
    """
    root = Path(path)
    inner = root / MODEL_DIR
    loose = not (root / VARIANT_JSON).is_file() and not (root / "config.json").is_file()
    if loose and not (root / MODEL_ONNX).is_file() and inner.is_dir():
        return inner
    return root


def _has_torch_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def variant_format(path: str | Path) -> str:
    """The format of a directory: ``variant.json``'s, else ``hf`` or ``onnx`` by its files.

    Raises:
        ArtifactError: no directory, no weights, or a format this module does not know.
    """
    root = resolve_model_dir(path)
    if not root.is_dir():
        raise ArtifactError(
            f"model directory not found: {root}",
            hint="pass a save_pretrained() directory or an optimize variant dir",
        )
    info = read_variant_json(root) if (root / VARIANT_JSON).is_file() else {}
    if info.get("format"):
        fmt = str(info["format"])
        if fmt not in FORMATS:
            raise ArtifactError(
                f"variant {info.get('variant')!r} in {root} has format {fmt!r}, which no "
                f"loader knows (known: {', '.join(FORMATS)})",
                hint="re-build the variant with this version of kiln optimize",
            )
        return fmt
    if (root / "config.json").is_file() and _has_torch_weights(root):
        return "hf"
    if (root / MODEL_ONNX).is_file():
        return "onnx"
    what = f"variant {info.get('variant')!r} in {root}" if info else str(root)
    raise ArtifactError(
        f"{what} holds neither Hugging Face weights nor {MODEL_ONNX}",
        hint="pass a save_pretrained() directory or an optimize variant dir",
    )


def available_backends(path: str | Path) -> list[Backend]:
    """The backends ``path`` can run on (torch first); a plain folder may hold both."""
    root = resolve_model_dir(path)
    fmt = variant_format(root)
    out: list[Backend] = [FORMATS[fmt]]
    if fmt == "hf" and not (root / VARIANT_JSON).is_file() and (root / MODEL_ONNX).is_file():
        out.append("onnx")
    return out


def load_variant(
    path: str | Path,
    *,
    backend: Backend | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> LoadedVariant:
    """Load ``path`` (a model or variant directory) on ``backend`` (default: its own).

    ``device``: ``cuda`` / ``cpu`` for the ``hf`` format (default: cuda when there
    is one); quantized torchao weights, programs and ONNX graphs run on the CPU.

    Raises:
        ArtifactError: the directory holds nothing loadable (the message says what is there).
        ConfigError: ``backend`` is not one this directory has weights for.
        DependencyMissingError: torchao (int8 formats) or onnxruntime is not installed.
    """
    root = resolve_model_dir(path)
    have = available_backends(root)
    chosen = backend or have[0]
    if chosen not in ("torch", "onnx"):
        raise ConfigError(f"unknown backend {chosen!r}", hint="one of torch, onnx")
    if chosen not in have:
        raise ConfigError(
            f"{root} has no weights for backend {chosen!r} (it has {have})",
            hint=f"use --backend {have[0]}",
        )
    info = read_variant_json(root) if (root / VARIANT_JSON).is_file() else {}
    if chosen == "onnx":
        return _load_onnx(root, info, threads)
    if threads:
        import torch

        torch.set_num_threads(threads)
    fmt = variant_format(root)
    if fmt in PROGRAM_FILES:
        return _load_program(root, info, fmt)
    return _load_module(root, info, fmt, device)


def _task(root: Path, info: dict[str, Any]) -> Any:
    from modelkiln.contract.hfmodel import inspect_model

    return inspect_model(root, info.get("task", "auto"))


def _need(module: str, purpose: str) -> None:
    """Raise DependencyMissingError when ``module`` cannot be imported (the onnx extra)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DependencyMissingError(module, "onnx", purpose=f"loading {purpose}")


def _torch_inputs(
    names: tuple[str, ...], vocab: int, device: str
) -> Callable[[int, int], dict[str, Any]]:
    def make(batch: int, seq: int) -> dict[str, Any]:
        import torch

        g = torch.Generator().manual_seed(batch * 1000 + seq)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = torch.zeros_like(ids)
        return {n: feed[n].to(device) for n in names}

    return make


def _load_module(root: Path, info: dict[str, Any], fmt: str, device: str | None) -> LoadedVariant:
    """``hf`` / ``hf-torchao`` / ``torchao-linear``: an HF module called with keywords."""
    import torch

    from modelkiln.contract.hfmodel import load_torch_model

    spec = _task(root, info)
    if fmt != "hf":
        _need("torchao", f"the {fmt} variant {info.get('variant')!r}")
    dtype = info.get("dtype", "float32") if fmt == "hf" else None
    if fmt == "torchao-linear":
        model = load_torchao_linear(root, spec.task)
    else:
        model = load_torch_model(spec, root, dtype=dtype)
    dev = "cpu"
    if fmt == "hf":
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(dev)
    extra = {"use_cache": False} if spec.task == "causal-lm" else {}

    def forward(feed: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model(**feed, **extra)

    return LoadedVariant(
        root, info.get("variant"), fmt, "torch", spec.task,
        str(next(model.parameters()).dtype).removeprefix("torch."), dev, spec.input_names,
        spec.vocab_size, spec.max_positions, forward,
        _torch_inputs(spec.input_names, spec.vocab_size, dev), module=model,
        sync=torch.cuda.synchronize if dev == "cuda" else None, info=info,
    )  # fmt: skip


def _load_program(root: Path, info: dict[str, Any], fmt: str) -> LoadedVariant:
    """``torchscript`` / ``torch-export``: a program taking ``input_names`` positionally."""
    import warnings

    import torch

    spec = _task(root, info)
    file = root / PROGRAM_FILES[fmt]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.jit.load(str(file), map_location="cpu").eval()
    else:
        program = torch.export.load(str(file)).module()
    names = tuple(info.get("input_names") or spec.input_names)

    def forward(feed: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return program(*(feed[n] for n in names))

    return LoadedVariant(
        root, info.get("variant"), fmt, "torch", spec.task, info.get("dtype", "float32"), "cpu",
        names, spec.vocab_size, spec.max_positions, forward,
        _torch_inputs(names, spec.vocab_size, "cpu"), info=info,
    )  # fmt: skip


def _config_sizes(root: Path) -> tuple[int, int | None]:
    """(vocab size, max positions) from ``config.json``; small ids when there is none."""
    cfg = root / "config.json"
    if not cfg.is_file():
        return 100, None  # token ids below 100 exist in every vocabulary
    data = json.loads(cfg.read_text(encoding="utf-8"))
    text = data.get("text_config") or data
    pos = text.get("max_position_embeddings") or text.get("n_positions")
    return int(text.get("vocab_size", 100)), pos


def _task_from_config(root: Path) -> str:
    """``causal-lm`` when config.json names a ``*ForCausalLM`` / ``*LMHeadModel``, else encoder."""
    cfg = root / "config.json"
    data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    archs = data.get("architectures")
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs or [])
    return "causal-lm" if causal else "encoder"


def _load_onnx(root: Path, info: dict[str, Any], threads: int | None) -> LoadedVariant:
    """An ONNX Runtime CPU session over ``model.onnx``; inputs as numpy arrays."""
    import numpy as np

    from modelkiln.onnxrt import cpu_session

    _need("onnxruntime", f"{root / MODEL_ONNX}")
    session = cpu_session(root / MODEL_ONNX, threads)
    names = tuple(i.name for i in session.get_inputs())
    unknown = [n for n in names if n not in ("input_ids", "attention_mask", "token_type_ids",
                                             "position_ids")]  # fmt: skip
    if unknown:
        raise ArtifactError(
            f"{root / MODEL_ONNX} needs inputs {unknown} that synthetic batches cannot make",
            hint="use a model whose graph takes input_ids / attention_mask",
        )
    vocab, max_pos = _config_sizes(root)

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

    def forward(feed: dict[str, Any]) -> Any:
        return session.run(None, feed)

    task = info.get("task") or _task_from_config(root)
    return LoadedVariant(
        root, info.get("variant"), "onnx", "onnx", task, info.get("dtype"), "cpu", names,
        vocab, max_pos, forward, make, onnx_path=root / MODEL_ONNX, info=info,
    )  # fmt: skip


def swap_conv1d(model: Any) -> Any:
    """Replace every GPT-2 ``Conv1D`` (``x @ W + b``, W: in x out) by an equal ``nn.Linear``.

    The module tree the ``torchao-linear`` format was saved from (torchao cannot
    quantize ``Conv1D``, so the optimize stage swaps it before quantizing).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = torch.nn.Linear(n_in, n_out, dtype=child.weight.dtype)
                linear.weight.data = child.weight.data.T.contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(module, child_name, linear)
    return model


def load_torchao_linear(root: Path, task: Any) -> Any:
    """Rebuild from ``config.json``, swap Conv1D for Linear, load the flattened torchao weights.

    The optimize stage writes this format and loads it back through this function too.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoConfig

    from modelkiln.contract.hfmodel import auto_class

    model = swap_conv1d(auto_class(task).from_config(AutoConfig.from_pretrained(root)))
    with safe_open(str(root / TORCHAO_WEIGHTS), framework="pt") as fh:
        metadata = fh.metadata()
    state, _ = unflatten_tensor_state_dict(load_file(root / TORCHAO_WEIGHTS), metadata)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the tied output embedding was not saved
    return model.eval()
