"""One calling convention for every variant: torch eager, torchao, ONNX Runtime.

A :class:`Runner` is a ``torch.nn.Module`` called like a Hugging Face model,
``runner(input_ids=..., attention_mask=..., token_type_ids=...)``, returning a
:class:`RunnerOutput` whose ``last_hidden_state`` (encoders) or ``logits``
(causal LMs) is an fp32 CPU tensor. So quality metrics written for HF models,
such as :func:`modelkiln.contract.codesearch.evaluate_code_search`, run unchanged on
any variant.

Example:
    >>> spec = inspect_model("runs/q/train/model")
    >>> runner = TorchRunner(load_torch_model(spec), spec)
    >>> runner(**synthetic_batch(spec, 2, 16, seed=0)).main.shape
    torch.Size([2, 16, 384])
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from modelkiln.contract import read_variant_json, write_variant_json
from modelkiln.contract.hfmodel import ModelInfo, Task, auto_class, inspect_model, load_torch_model

# Model loading and variant.json live in the artifact contract; re-exported for callers here.
__all__ = [
    "ModelInfo",
    "OrtRunner",
    "Runner",
    "RunnerOutput",
    "Task",
    "TorchRunner",
    "auto_class",
    "copy_side_files",
    "inspect_model",
    "load_torch_model",
    "read_variant_json",
    "synthetic_batch",
    "write_variant_json",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt")
SKIP_DIRS = {"onnx", "openvino", ".git"}


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


def synthetic_batch(
    spec: ModelInfo, batch: int, seq: int, *, seed: int = 0, pad_last: bool = False
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

    def __init__(self, spec: ModelInfo, input_names: tuple[str, ...] | None = None) -> None:
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

    def __init__(self, model: torch.nn.Module, spec: ModelInfo) -> None:
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

    def __init__(self, onnx_path: Path, spec: ModelInfo, threads: int | None = None) -> None:
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
