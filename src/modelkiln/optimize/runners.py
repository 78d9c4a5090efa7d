"""One calling convention for every variant: torch eager, torchao, ONNX Runtime.

A :class:`Runner` is a ``torch.nn.Module`` called like a Hugging Face model,
``runner(input_ids=..., attention_mask=..., token_type_ids=...)``, returning a
:class:`RunnerOutput` whose ``last_hidden_state`` (encoders) or ``logits``
(causal LMs) is an fp32 CPU tensor. So quality metrics written for HF models,
such as :func:`modelkiln.train.encoder.evaluate_code_search`, run unchanged on
any variant.

Example:
    >>> spec = inspect_model("runs/q/train/model")
    >>> runner = TorchRunner(load_torch_model(spec), spec)
    >>> runner(**synthetic_batch(spec, 2, 16, seed=0)).main.shape
    torch.Size([2, 16, 384])
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from modelkiln.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Task = Literal["encoder", "causal-lm"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt")
SKIP_DIRS = {"onnx", "openvino", ".git"}


@dataclass(frozen=True)
class ModelSpec:
    """A model directory and what the optimizer needs to know about it."""

    path: Path
    task: Task
    model_type: str
    architecture: str
    vocab_size: int
    input_names: tuple[str, ...]
    hidden_size: int
    num_heads: int
    max_positions: int | None


def inspect_model(model_dir: str | Path, task: Literal["auto", Task] = "auto") -> ModelSpec:
    """Read ``config.json`` of a Hugging Face model directory.

    Raises:
        ArtifactError: the directory has no ``config.json``.
        ConfigError: the architecture is neither an encoder nor a causal LM (e.g. seq2seq).
    """
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ArtifactError(
            f"{path} is not a Hugging Face model directory (no config.json)",
            hint="pass the 'model' folder of a train artifact or a save_pretrained() directory",
        )
    config = AutoConfig.from_pretrained(path)
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__.removesuffix("Config") + "Model"
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{arch} is an encoder-decoder model; optimize handles encoders and causal LMs",
            hint="optimize the encoder or a decoder-only model",
        )
    if task == "auto":
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        task = "causal-lm" if causal else "encoder"
    names: tuple[str, ...] = ("input_ids", "attention_mask")
    if task == "encoder" and getattr(config, "type_vocab_size", None):
        names += ("token_type_ids",)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelSpec(
        path=path,
        task=task,
        model_type=str(getattr(config, "model_type", "")),
        architecture=arch,
        vocab_size=int(text.vocab_size),
        input_names=names,
        hidden_size=int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)),
        num_heads=int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0)),
        max_positions=getattr(text, "max_position_embeddings", None)
        or getattr(text, "n_positions", None),
    )


def auto_class(task: Task) -> Any:
    """``AutoModel`` for encoders, ``AutoModelForCausalLM`` for causal LMs."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if task == "causal-lm" else AutoModel


def load_torch_model(
    spec: ModelSpec,
    path: Path | None = None,
    dtype: torch.dtype | None = torch.float32,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load ``path`` (default: the spec's directory) in eval mode on the CPU.

    ``dtype=None`` keeps the checkpoint's dtype; ``kwargs`` go to ``from_pretrained``.
    """
    extra = {"dtype": dtype} if dtype is not None else {}
    model = auto_class(spec.task).from_pretrained(path or spec.path, **extra, **kwargs)
    return model.eval()


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and pooling files (everything but weights and config.json); return names."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.name == "config.json" or item.name.startswith("."):
            continue
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
        elif item.is_dir() and item.name not in SKIP_DIRS:
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
            copied.append(item.name + "/")
    return copied


def write_variant_json(out: Path, info: dict[str, Any]) -> None:
    """Record what a variant directory holds (read back by :func:`read_variant_json`)."""
    (out / "variant.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))


def read_variant_json(path: Path) -> dict[str, Any]:
    """The ``variant.json`` of a variant directory.

    Raises:
        ArtifactError: the directory is not a variant written by modelkiln.
    """
    file = Path(path) / "variant.json"
    if not file.is_file():
        raise ArtifactError(
            f"{path} is not an optimized variant (no variant.json)",
            hint="pass a directory written by modelkiln.optimize",
        )
    info: dict[str, Any] = json.loads(file.read_text())
    return info


def synthetic_batch(
    spec: ModelSpec, batch: int, seq: int, *, seed: int = 0, pad_last: bool = False
) -> dict[str, torch.Tensor]:
    """Random token ids ``(batch, seq)`` with a full mask (the last row padded if asked)."""
    generator = torch.Generator().manual_seed(seed)
    low = min(5, spec.vocab_size - 1)
    ids = torch.randint(low, spec.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last and seq > 2:
        mask[-1, seq - seq // 3 :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.input_names:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


@dataclass
class RunnerOutput:
    """The model's main output, fp32 on the CPU, under both names the callers use."""

    main: torch.Tensor

    @property
    def last_hidden_state(self) -> torch.Tensor:
        """Encoder hidden states ``(B, T, H)``."""
        return self.main

    @property
    def logits(self) -> torch.Tensor:
        """Causal-LM logits ``(B, T, V)``."""
        return self.main


class Runner(torch.nn.Module, ABC):
    """Run one variant: ``runner(**batch) -> RunnerOutput``; subclasses implement :meth:`run`."""

    def __init__(self, spec: ModelSpec, input_names: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.input_names = input_names or spec.input_names
        # An empty parameter, so ``next(runner.parameters()).device`` works (CPU).
        self._anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    @abstractmethod
    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """The main output for ``feed`` (only the inputs this runner declares)."""

    def forward(self, **inputs: torch.Tensor) -> RunnerOutput:
        """Call with HF-style keyword inputs; unknown inputs are ignored."""
        ids = inputs["input_ids"]
        feed = {"input_ids": ids}
        for name in self.input_names:
            if name == "input_ids":
                continue
            value = inputs.get(name)
            feed[name] = value if value is not None else _default_input(name, ids)
        return RunnerOutput(self.run(feed).float())


def _default_input(name: str, ids: torch.Tensor) -> torch.Tensor:
    """The value a model assumes for an omitted input: an all-ones mask, else zeros."""
    return torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)


class TorchRunner(Runner):
    """A PyTorch model (eager; any dtype or torchao-quantized weights)."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model = model.eval()

    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward pass without autograd; the KV cache is off for causal LMs."""
        extra = {"use_cache": False} if self.spec.task == "causal-lm" else {}
        with torch.inference_mode():
            out = self.model(**feed, **extra)
        result: torch.Tensor = out.logits if self.spec.task == "causal-lm" else out[0]
        return result


class OrtRunner(Runner):
    """An ONNX Runtime CPU session over ``model.onnx``; the first graph output is the main one."""

    def __init__(self, onnx_path: Path, spec: ModelSpec, threads: int | None = None) -> None:
        from modelkiln.onnxrt import cpu_session

        session = cpu_session(onnx_path, threads)
        names = tuple(i.name for i in session.get_inputs())
        super().__init__(spec, names)
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run_all(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every graph output, by name."""
        arrays = {k: v.detach().cpu().numpy() for k, v in feed.items() if k in self.input_names}
        outs = self.session.run(None, arrays)
        return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs, strict=True)}

    def run(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """The first graph output."""
        arrays = {k: v.detach().cpu().numpy() for k, v in feed.items() if k in self.input_names}
        return torch.from_numpy(self.session.run(self.output_names[:1], arrays)[0])
