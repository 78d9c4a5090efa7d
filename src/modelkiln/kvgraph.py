"""The KV-cache ONNX graph of a causal LM: export, parity check, greedy decoding in ORT.

Core (no stage imports): the optimize stage writes this graph into every ONNX
variant of a causal LM, and the serve stage exports it with
:func:`export_kv_graph` for an ONNX causal LM that ships none, so neither
stage reaches into the other.

The graph (one graph for prefill and decode, like optimum's merged decoder)::

    inputs:  input_ids (B, S), attention_mask (B, P+S), position_ids (B, S),
             past_key_values.{i}.key / .value (B, H_kv, P, D) for every layer i
    outputs: logits (B, 1, V) of the last position,
             present.{i}.key / .value (B, H_kv, P+S, D)

Prefill feeds empty past tensors (``P = 0``). Inside the graph the past
tensors become a transformers :class:`~transformers.DynamicCache`
(``DynamicCache(ddp_cache_data=...)``; transformers 5 has no
``from_legacy_cache``), and the updated cache layers are returned as the
``present`` outputs. Positions are an input, so rows may be left-padded
(zeros in ``attention_mask``): that is how the serving engine batches
sequences of different lengths (:mod:`modelkiln.serve.generation.ort_backend`).
Only the last position's logits leave the graph (``logits_to_keep=1``): a
prefill never pays for a ``[B, S, vocab]`` output it does not need.

Example:
    >>> export_kv_graph(Path("runs/q/train/model"), Path("out/model_kv.onnx"))
    >>> export_kv_onnx(model, spec, Path("out/model_kv.onnx"))
    >>> gen = OrtKvGenerator(Path("out/model_kv.onnx"))
    >>> gen.generate(prompt_ids, max_new_tokens=32)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import KV_ONNX
from modelkiln.errors import ConfigError, KilnError, ServingError, require
from modelkiln.onnxexport import export_guard

if TYPE_CHECKING:
    import numpy as np
    import torch

    from modelkiln.contract.hfmodel import ModelInfo

__all__ = [
    "KV_ONNX",
    "CacheShape",
    "KvParityReport",
    "OrtKvGenerator",
    "cache_shape",
    "check_kv_parity",
    "export_kv_graph",
    "export_kv_onnx",
    "kv_input_names",
    "kv_output_names",
    "kv_parity_prompts",
    "positions_from_mask",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    """Per-layer cache geometry: ``(B, heads, P, head_dim)`` for each of ``layers`` layers."""

    layers: int
    heads: int
    head_dim: int


def cache_shape(config: Any) -> CacheShape:
    """Cache geometry from a transformers config (GQA: ``num_key_value_heads``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return CacheShape(int(layers), int(kv_heads), int(head_dim))


def kv_input_names(shape: CacheShape) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]


def kv_output_names(shape: CacheShape) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for every layer."""
    return [f"present.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]


def _wrapper(model: torch.nn.Module, shape: CacheShape) -> torch.nn.Module:
    import torch
    from transformers import DynamicCache

    config: Any = model.config

    class KvWrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(shape.layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=config)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            present = out.past_key_values
            flat: list[torch.Tensor] = []
            for layer in present.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return KvWrapper().eval()


def export_kv_onnx(
    model: torch.nn.Module, spec: ModelInfo, path: Path, *, opset: int = 17
) -> list[str]:
    """Export a causal LM with past/present KV tensors and dynamic batch / length axes.

    Traced with a non-empty past (3 cached tokens, 4 new ones) so the
    concatenation of past and new keys is in the graph, and with one
    left-padded row so the tracer keeps the padding mask (an all-ones example
    would let transformers drop it); prefill then runs with an empty past.
    Returns the output names.

    Raises:
        ConfigError: ``spec`` is not a causal LM.
        StageError: the exporter cannot handle this architecture (one line naming it).
    """
    import torch

    if spec.task != "causal-lm":
        raise ConfigError(
            f"KV-cache export needs a causal LM, got {spec.task} {spec.architecture}",
            hint="use export_onnx for encoders",
        )
    shape = cache_shape(model.config)
    gen = torch.Generator().manual_seed(1)
    batch, past_len, new_len = 2, 3, 4
    ids = torch.randint(5, spec.vocab_size, (batch, new_len), generator=gen)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :2] = 0  # row 0 is left-padded by two columns
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    past = [torch.randn(batch, shape.heads, past_len, shape.head_dim, generator=gen) * 0.1
            for _ in range(2 * shape.layers)]  # fmt: skip
    in_names = ["input_ids", "attention_mask", "position_ids", *kv_input_names(shape)]
    out_names = ["logits", *kv_output_names(shape)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    axes |= {n: {0: "batch", 2: "past_sequence"} for n in kv_input_names(shape)}
    axes |= {n: {0: "batch", 2: "total_sequence"} for n in kv_output_names(shape)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with export_guard(
        model,
        f"KV-cache ONNX export cannot handle {spec.architecture}",
        hint="use the cache-free export (onnx-fp32) for this model",
    ):
        torch.onnx.export(
            _wrapper(model, shape),
            (ids, mask, positions, *past),
            str(path),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return out_names


def export_kv_graph(model_dir: Path, target: Path) -> None:
    """Export the fp32 KV-cache graph of the Hugging Face causal LM in ``model_dir`` to ``target``.

    For a server given an ONNX causal LM without ``model_kv.onnx``: it loads the
    HF weights next to the ONNX graph and writes the same graph the optimize
    stage ships with every ONNX variant.

    Raises:
        DependencyMissingError: onnxruntime / onnx are not installed.
        ServingError: the directory holds no causal LM, or the exporter cannot trace it.
    """
    from modelkiln.contract.hfmodel import inspect_model, load_torch_model

    require("onnxruntime", "onnx", purpose="the onnx generation backend")
    log.info("exporting a KV-cache ONNX graph of %s", model_dir)
    try:
        spec = inspect_model(model_dir, "causal-lm")
        export_kv_onnx(load_torch_model(spec), spec, target)
    except KilnError as exc:
        raise ServingError(
            f"cannot run '{model_dir}' on the onnx generation backend: {exc}",
            hint="serve it with backend: torch, or export it first with `kiln optimize model`",
        ) from exc


class OrtKvGenerator:
    """Greedy decoding with a KV-cache graph in ONNX Runtime (CPU).

    Args:
        onnx_path: a graph written by :func:`export_kv_onnx` (or a quantized copy of one).
        threads: intra-op threads (None: ONNX Runtime's default).
    """

    def __init__(self, onnx_path: Path, threads: int | None = None) -> None:
        from modelkiln.onnxrt import cpu_session

        self.session = cpu_session(onnx_path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = inputs[self.past_names[0]].shape
        self.heads, self.head_dim = int(first[1]), int(first[3])

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors for the prefill step."""
        import numpy as np

        empty = np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32)
        return {n: empty for n in self.past_names}

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: dict[str, np.ndarray],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward pass: (last-position logits ``(B, 1, V)``, the next step's past).

        ``position_ids`` default to the count of attended columns before each new
        token (right for left-padded rows too).
        """
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        feed = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            **past,
        }
        outs = self.session.run(None, feed)
        logits, presents = outs[0], outs[1:]
        names = [n.replace("present.", "past_key_values.", 1) for n in self.output_names[1:]]
        return logits, dict(zip(names, presents, strict=True))

    def generate(
        self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None
    ) -> np.ndarray:
        """Greedy continuation of ``input_ids`` (B, T) (no left padding): returns (B, T + new)."""
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = self.step(ids, mask, self.empty_past(ids.shape[0]))
        tokens = [ids]
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if done.all() or i == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones_like(nxt[:, None])], axis=1)
            logits, past = self.step(nxt[:, None], mask, past)
        return np.concatenate(tokens, axis=1)


def positions_from_mask(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids of the last ``new`` columns: attended columns before each, minus one."""
    import numpy as np

    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.clip(mask.cumsum(-1) - 1, 0, None)[:, -new:]


@dataclass
class KvParityReport:
    """Logits of the KV graph vs PyTorch at prefill and at each decode step, and greedy equality."""

    max_abs: list[float] = field(default_factory=list)
    atol: float = 1e-4
    greedy_equal: bool = False
    steps: int = 0

    @property
    def ok(self) -> bool:
        """True when every step is within ``atol`` and greedy decoding gave the same tokens."""
        return bool(self.max_abs) and max(self.max_abs) <= self.atol and self.greedy_equal

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"ok": self.ok}


def check_kv_parity(
    model: torch.nn.Module,
    onnx_path: Path,
    prompt_ids: torch.Tensor,
    *,
    steps: int = 4,
    atol: float = 1e-4,
    max_new_tokens: int = 8,
) -> KvParityReport:
    """Compare the KV graph with the PyTorch model's own cache, step by step.

    Last-position logits at prefill, then ``steps`` decode steps fed the same
    (greedy) tokens to both; then ``torch generate`` (greedy) against
    :meth:`OrtKvGenerator.generate`.
    """
    import numpy as np
    import torch

    gen = OrtKvGenerator(onnx_path)
    report = KvParityReport(atol=atol, steps=steps)
    ids = prompt_ids.long()
    mask = torch.ones_like(ids)
    model.eval()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        ref = out.logits
        got, past = gen.step(ids.numpy(), mask.numpy(), gen.empty_past(ids.shape[0]))
        report.max_abs.append(float((torch.from_numpy(got) - ref[:, -1:]).abs().max()))
        for _ in range(steps):
            nxt = ref[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, ref = out.past_key_values, out.logits
            got, past = gen.step(nxt.numpy(), mask.numpy(), past)
            report.max_abs.append(float((torch.from_numpy(got) - ref[:, -1:]).abs().max()))
        expected = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    produced = gen.generate(ids.numpy(), max_new_tokens)
    report.greedy_equal = bool(np.array_equal(produced, expected.numpy()))
    return report


def kv_parity_prompts(spec: ModelInfo, lengths: Sequence[int] = (5, 9)) -> list[torch.Tensor]:
    """Seeded random prompts (batch 1 and 2) for :func:`check_kv_parity`."""
    import torch

    gen = torch.Generator().manual_seed(3)
    low = min(5, spec.vocab_size - 1)
    return [torch.randint(low, spec.vocab_size, (b + 1, n), generator=gen)
            for b, n in enumerate(lengths)]  # fmt: skip
