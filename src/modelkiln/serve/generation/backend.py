"""Execution layer: a Hugging Face causal LM run step by step over a changing batch.

The running sequences share ONE batched, left-padded KV cache (a transformers
``DynamicCache``). Row ``i`` holds its ``lengths[i]`` cached tokens right-aligned
in ``[width - lengths[i], width)``; the columns before are padding (zeros,
masked out). That layout lets one forward call decode every running sequence:

- decode: input ``[B, 1]``, ``position_ids = lengths``, a 2-D mask built from
  ``lengths``; the cache appends one column for everybody, exactly as
  ``generate`` does for a left-padded batch (same copy cost per step).
- join: new prompts are prefilled in groups of similar length (left-padded,
  ``logits_to_keep=1``, so one long prompt never pads many short ones), then the
  batch cache and the new ones are left-padded to a common width and stacked
  along the batch (one copy, only in steps where somebody joins).
- leave: the finished rows are dropped with one ``index_select`` and the
  leading columns that are padding for every remaining row are cut off.

Why not one cache per sequence, stacked every step: that copies the whole KV
cache twice per step (stack + unstack) where this layout copies it once (the
``torch.cat`` inside ``DynamicLayer.update``, which ``generate`` pays too).
Only plain full-attention caches are supported (GPT-2, Llama, Qwen2, ...);
models with sliding-window or linear-attention layers are refused at load.

LoRA adapters loaded at run time (:meth:`TorchCausalLMBackend.load_adapter`)
share the base weights: once one is loaded the model runs through peft with
``adapter_names=`` (one name per row, ``"__base__"`` for the base model), so a
single forward pass serves a batch that mixes adapters (peft's mixed-batch
LoRA inference). Unloading the last adapter removes the LoRA layers again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ServingError
from modelkiln.hardware import Precision, model_matmul_shape, precision_decision, torch_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Adapter name peft uses for "no adapter" rows in a mixed batch.
BASE_ADAPTER = "__base__"


@dataclass
class _Part:
    """Sequences in one KV cache: ids in row order, cached lengths, cache width."""

    cache: Any
    rids: list[str]
    lengths: torch.Tensor
    width: int


class TorchCausalLMBackend:
    """Batched prefill / decode of a transformers causal LM with a shared left-padded KV cache.

    Not thread-safe: one thread (the engine's worker) calls it at a time.

    Args:
        model: a transformers ``*ForCausalLM`` (already on its device, any dtype).
        max_model_len: longest sequence (prompt + output); defaults to the model's
            ``max_position_embeddings`` / ``n_positions``.

    Example:
        >>> backend = TorchCausalLMBackend.from_path("runs/x/train/model")
        >>> logits = backend.prefill([("a", [1, 2, 3])])        # [1, vocab], fp32
        >>> logits = backend.decode(["a"], [int(logits.argmax())])
    """

    def __init__(self, model: Any, *, max_model_len: int | None = None) -> None:
        import torch

        self.model = model.eval()
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text_config = self.config.get_text_config(decoder=True)
        limit = getattr(text_config, "max_position_embeddings", None) or getattr(
            text_config, "n_positions", None
        )
        self.max_model_len: int = int(max_model_len or limit or 2048)
        self._pad_id = 0
        self._rows: list[str] = []
        self._lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self._cache: Any = None
        self._width = 0
        self._peft: Any = None  # PeftModel wrapping self.model once an adapter is loaded
        self._row_adapter: dict[str, str] = {}  # request id -> adapter name (absent: base)
        self._check_cache_layout()

    @classmethod
    def from_path(
        cls,
        model_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        precision: Precision = "auto",
        device: str | None = None,
        loader: Callable[[Path], Any] | None = None,
    ) -> TorchCausalLMBackend:
        """Load a causal LM saved with ``save_pretrained`` (and merge a PEFT adapter into it).

        ``loader`` (a plug-in's, e.g. encrypted weights) is asked first for the model.

        Raises:
            ServingError: the directory does not hold a loadable causal LM or adapter.
        """
        from transformers import AutoModelForCausalLM

        from modelkiln.hardware import device_name

        device = device or device_name()
        decision = precision_decision(precision, device, model_matmul_shape(model_dir))
        log.info(
            "causal LM %s runs in %s: %s", Path(model_dir).name, decision.value, decision.reason
        )
        dtype = torch_dtype(decision.value)
        try:
            model: Any = loader(Path(model_dir)) if loader is not None else None
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
            model = model.to(dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ServingError(
                f"cannot load a causal LM from '{model_dir}': {exc}",
                hint="pass a directory written by save_pretrained (config.json + weights)",
            ) from exc
        if adapter is not None:
            model = _merge_adapter(model, adapter)
        return cls(model.to(device))

    # ------------------------------------------------------------------ state
    @property
    def rows(self) -> list[str]:
        """Request ids currently in the KV cache, in row order."""
        return list(self._rows)

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded at run time."""
        return sorted(self._peft.peft_config) if self._peft is not None else []

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the PEFT LoRA adapter saved in ``path`` under ``name`` (weights stay unmerged).

        Raises:
            ServingError: the name is taken, or ``path`` holds no adapter for this model.
        """
        from modelkiln.errors import require

        require("peft", "train", purpose="serving LoRA adapters")
        from peft import PeftModel

        if name in self.adapters or name == BASE_ADAPTER:
            raise ServingError(
                f"an adapter named {name!r} is already loaded", hint="unload it first"
            )
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            if self._peft is not None and not self._peft.peft_config:
                self._drop_peft()
            raise ServingError(
                f"cannot load the adapter in '{path}': {exc}",
                hint="pass a directory written by PeftModel.save_pretrained for this base model",
            ) from exc
        self._peft.eval()
        kind = self._peft.peft_config[name].peft_type
        if str(getattr(kind, "value", kind)) != "LORA":
            self.unload_adapter(name)
            raise ServingError(
                f"the adapter in '{path}' is {kind}, not LoRA",
                hint="only LoRA adapters can be served per request",
            )

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; rows still using it must be released first.

        Raises:
            ServingError: no adapter of that name is loaded.
        """
        if name not in self.adapters:
            raise ServingError(
                f"no adapter named {name!r} is loaded", hint="see GET /admin/adapters"
            )
        if len(self.adapters) == 1:
            self._drop_peft()
        else:
            self._peft.delete_adapter(name)

    def _drop_peft(self) -> None:
        """Strip every LoRA layer and go back to the plain model."""
        self.model = self._peft.unload()
        self._peft = None

    def _forward(self, rids: Sequence[str], **kwargs: Any) -> Any:
        """One forward pass; with adapters loaded, each row runs with its own adapter."""
        if self._peft is None:
            return self.model(**kwargs)
        names = [self._row_adapter.get(rid, BASE_ADAPTER) for rid in rids]
        return self._peft(**kwargs, adapter_names=names)

    @property
    def vocab_size(self) -> int:
        """Width of the logits this backend returns."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def generation_config(self) -> Any:
        """The model's ``GenerationConfig`` (EOS ids), if it has one."""
        return getattr(self.model, "generation_config", None)

    def reset(self) -> None:
        """Drop every sequence and the whole cache."""
        import torch

        self._rows, self._cache, self._width = [], None, 0
        self._row_adapter.clear()
        self._lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    def release(self, request_ids: Sequence[str]) -> None:
        """Free the cache rows of ``request_ids`` (unknown ids are ignored)."""
        import torch

        drop = set(request_ids)
        keep = [i for i, rid in enumerate(self._rows) if rid not in drop]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for rid in drop:
            self._row_adapter.pop(rid, None)
        self._rows = [self._rows[i] for i in keep]
        self._lengths = self._lengths.index_select(0, index)
        width = int(self._lengths.max())
        cut = self._width - width  # leading columns that are padding for every kept row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:, :]
            layer.values = layer.values.index_select(0, index)[:, :, cut:, :]
        self._width = width

    # ------------------------------------------------------------------ steps
    def prefill(
        self,
        requests: Sequence[tuple[str, Sequence[int]]],
        adapters: dict[str, str] | None = None,
    ) -> torch.Tensor:
        """Run the prompts of new sequences and add them to the batch.

        Prompts of similar length are run together (left-padded) so padding never
        makes a forward pass much bigger than its real tokens.

        Args:
            requests: ``(request_id, prompt_ids)`` pairs; ids must not be in the batch.
            adapters: adapter name by request id for sequences that use one (else base).

        Returns:
            fp32 logits of each prompt's last position, ``[len(requests), vocab]``.
        """
        import torch

        assert not {rid for rid, _ in requests} & set(self._rows), "request already in batch"
        for rid, name in (adapters or {}).items():
            if name not in self.adapters:
                raise ServingError(f"no adapter named {name!r} is loaded", hint="load it first")
            self._row_adapter[rid] = name
        parts: list[_Part] = []
        logits: dict[str, torch.Tensor] = {}
        for group in length_groups(requests):
            part, group_logits = self._prefill_group(group)
            parts.append(part)
            logits.update(zip(part.rids, group_logits, strict=True))
        self._join(parts)
        return torch.stack([logits[rid] for rid, _ in requests])

    def decode(self, request_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to every sequence in the batch; returns fp32 logits ``[B, vocab]``.

        ``request_ids`` must name exactly the sequences in the batch (every cached
        row advances together); the logits come back in the order of ``request_ids``.
        """
        import torch

        assert sorted(request_ids) == sorted(self._rows), "decode must cover the whole batch"
        row_of = {rid: i for i, rid in enumerate(self._rows)}
        order = [row_of[rid] for rid in request_ids]
        ids = torch.empty(len(self._rows), 1, dtype=torch.long)
        for rid, token in zip(request_ids, tokens, strict=True):
            ids[row_of[rid], 0] = token
        lengths = self._lengths
        mask = _left_pad_mask(lengths + 1, self._width + 1)
        with torch.inference_mode():
            out = self._forward(
                self._rows,
                input_ids=ids.to(self.device),
                attention_mask=mask.long(),
                position_ids=lengths.unsqueeze(1),
                past_key_values=self._cache,
                use_cache=True,
            )
        self._lengths = lengths + 1
        self._width += 1
        logits = out.logits[:, -1, :].float()
        if order != list(range(len(order))):
            logits = logits[torch.tensor(order, device=logits.device)]
        return logits

    def warmup(self) -> None:
        """One prefill and one decode on a throw-away sequence (first calls are slow)."""
        rid = "__warmup__"
        logits = self.prefill([(rid, [self._pad_id, self._pad_id])])
        self.decode([rid], [int(logits[0].argmax())])
        self.release([rid])

    # ---------------------------------------------------------------- helpers
    def _prefill_group(self, group: Sequence[tuple[str, Sequence[int]]]) -> tuple[_Part, Any]:
        import torch
        from transformers import DynamicCache

        lengths = torch.tensor([len(p) for _, p in group], dtype=torch.long)
        width = int(lengths.max())
        ids = torch.full((len(group), width), self._pad_id, dtype=torch.long)
        for i, (_, prompt) in enumerate(group):
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask = _left_pad_mask(lengths, width)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        with torch.inference_mode():
            out = self._forward(
                [rid for rid, _ in group],
                input_ids=ids.to(self.device),
                attention_mask=mask.long().to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if bool((lengths < width).any()):
            _zero_padding(cache, mask.to(self.device))  # padded K/V may be NaN; 0 * NaN = NaN
        part = _Part(cache, [rid for rid, _ in group], lengths.to(self.device), width)
        return part, out.logits[:, -1, :].float()

    def _join(self, parts: list[_Part]) -> None:
        """Add prefilled groups to the batch: one copy of the cache, however many groups."""
        import torch

        if self._cache is not None:
            parts = [_Part(self._cache, self._rows, self._lengths, self._width), *parts]
        if len(parts) > 1:
            width = max(part.width for part in parts)
            for i, layer in enumerate(parts[0].cache.layers):
                layer.keys = _stack_left_padded([p.cache.layers[i].keys for p in parts], width)
                layer.values = _stack_left_padded([p.cache.layers[i].values for p in parts], width)
        self._cache = parts[0].cache
        self._rows = [rid for part in parts for rid in part.rids]
        self._lengths = torch.cat([part.lengths for part in parts])
        self._width = max(part.width for part in parts)

    def _check_cache_layout(self) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise ServingError(
                f"{type(self.model).__name__} uses sliding-window or linear-attention cache layers,"
                " which the torch generation backend does not batch",
                hint="serve a full-attention causal LM (GPT-2, Llama, Qwen2, ...)",
            )


def _left_pad_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[B, width]``: True on the last ``lengths[i]`` columns of row ``i``."""
    import torch

    cols = torch.arange(width, device=lengths.device)
    return cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)


def _zero_padding(cache: Any, mask: torch.Tensor) -> None:
    keep = mask[:, None, :, None]
    for layer in cache.layers:
        layer.keys = layer.keys.masked_fill(~keep, 0)
        layer.values = layer.values.masked_fill(~keep, 0)


def _stack_left_padded(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[b_i, H, l_i, D]`` tensors into ``[sum b_i, H, width, D]``, right-aligned."""
    import torch

    _, heads, _, dim = tensors[0].shape
    total = sum(t.shape[0] for t in tensors)
    first = tensors[0]
    out = torch.zeros(total, heads, width, dim, dtype=first.dtype, device=first.device)
    row = 0
    for t in tensors:
        out[row : row + t.shape[0], :, width - t.shape[2] :] = t
        row += t.shape[0]
    return out


def length_groups(
    requests: Sequence[tuple[str, Sequence[int]]], slack: int = 64
) -> list[list[tuple[str, Sequence[int]]]]:
    """Split prompts (sorted by length) into groups whose padded size stays near their real size.

    A prompt joins the current group while ``count * longest <= 1.5 * real tokens`` or the
    padding stays under ``slack`` tokens; one very long prompt never pads 31 short ones.
    """
    groups: list[list[tuple[str, Sequence[int]]]] = []
    real = 0
    for item in sorted(requests, key=lambda r: len(r[1])):
        n = len(item[1])
        if groups:
            padded = (len(groups[-1]) + 1) * n
            if padded <= 1.5 * (real + n) or padded - (real + n) <= slack:
                groups[-1].append(item)
                real += n
                continue
        groups.append([item])
        real = n
    return groups


def _merge_adapter(model: Any, adapter: str | Path) -> Any:
    from modelkiln.errors import require

    require("peft", "train", purpose="serving a LoRA adapter")
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError) as exc:
        raise ServingError(
            f"cannot load the adapter in '{adapter}': {exc}",
            hint="pass a directory written by PeftModel.save_pretrained",
        ) from exc
    log.info("merging adapter %s into the base weights", adapter)
    return peft_model.merge_and_unload()
