"""Execution layer on ONNX Runtime: a KV-cache graph run step by step over a changing batch.

Same contract and cache layout as :class:`~modelkiln.serve.generation.backend.TorchCausalLMBackend`
(one shared left-padded KV cache; row ``i`` right-aligned; decode feeds one
token per running row; prefill groups prompts of similar length; leaving rows
are dropped and the all-padding leading columns cut), over the graph that
:func:`~modelkiln.kvgraph.export_kv_onnx` writes (``model_kv.onnx``:
``input_ids``, ``attention_mask``, ``position_ids`` and the past tensors in;
last-position logits and the present tensors out). The cache lives in numpy
arrays between steps; the graph concatenates past and new keys itself, the
same one copy per step that transformers' ``DynamicCache`` pays.

Why a second backend: on this project's reference CPU (2 cores, AVX2) one
decode step of 32 rows of the quickstart model takes ~21 ms in eager PyTorch
and ~9-11 ms in ONNX Runtime (fp32 or dynamic int8), where per-operator
dispatch, not arithmetic, dominates (docs/BENCHMARKS.md ``serve-completions``).
It is also how the serving stage runs what the optimization stage promotes:
every ONNX Runtime variant of a causal LM ships a ``model_kv.onnx``.

Sources: a variant directory (``model_kv.onnx`` + ``config.json`` + tokenizer),
or a Hugging Face directory, whose KV graph is exported (fp32) at load time by
the core helper :func:`~modelkiln.kvgraph.export_kv_graph` (the same graph the
optimize stage ships) into a temporary directory that lives as long as the backend.

Runtime LoRA adapters are not supported here (the graph has the weights
folded in); serve adapters with the torch backend.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ServingError
from modelkiln.kvgraph import KV_ONNX, export_kv_graph, positions_from_mask
from modelkiln.serve.config import has_torch_weights
from modelkiln.serve.generation.backend import length_groups

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)


class OrtCausalLMBackend:
    """Batched prefill / decode of a KV-cache ONNX graph with a shared left-padded cache.

    Not thread-safe: one thread (the engine's worker) calls it at a time.

    Args:
        onnx_path: a graph written by :func:`~modelkiln.kvgraph.export_kv_onnx`
            (or a quantized copy of one).
        config: the model's transformers config (context length, vocabulary, EOS).
        threads: ONNX Runtime intra-op threads (None: its default).
        generation_config: the model's ``GenerationConfig`` (EOS ids), if any.

    Example:
        >>> backend = OrtCausalLMBackend.from_path("runs/x/optimize/model")
        >>> logits = backend.prefill([("a", [1, 2, 3])])        # [1, vocab], fp32
        >>> logits = backend.decode(["a"], [int(logits.argmax())])
    """

    def __init__(
        self,
        onnx_path: str | Path,
        config: Any,
        *,
        threads: int | None = None,
        generation_config: Any = None,
        max_model_len: int | None = None,
        session: Any = None,
    ) -> None:
        import numpy as np

        from modelkiln.onnxrt import cpu_session

        try:
            # session: opened by a plug-in (e.g. decrypted in memory), else read here
            self.session = session if session is not None else cpu_session(onnx_path, threads)
        except Exception as exc:  # boundary: onnxruntime raises its own exception types
            raise ServingError(
                f"cannot load the KV-cache graph '{onnx_path}': {exc}",
                hint="re-export it with `kiln optimize model` (it writes model_kv.onnx)",
            ) from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask", "position_ids"} - set(inputs)
        if missing:
            raise ServingError(
                f"'{onnx_path}' is not a KV-cache graph with position inputs "
                f"(missing {', '.join(sorted(missing))})",
                hint="re-export it with this version of modelkiln (`kiln optimize model`)",
            )
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        outputs = [o.name for o in self.session.get_outputs()]
        self._present = {n.replace("present.", "past_key_values.", 1): n for n in outputs[1:]}
        first = inputs[self.past_names[0]].shape
        self._heads, self._head_dim = int(first[1]), int(first[3])
        self._dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.config = config
        self.generation_config = generation_config
        getter = getattr(config, "get_text_config", None)
        text = getter(decoder=True) if getter is not None else config
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        self.max_model_len: int = int(max_model_len or limit or 2048)
        self._vocab = int(getattr(text, "vocab_size", 0) or 0)
        self._pad_id = 0
        self._rows: list[str] = []
        self._lengths = np.zeros(0, dtype=np.int64)
        self._past: dict[str, np.ndarray] = {}
        self._width = 0
        self._tmp: Path | None = None

    @classmethod
    def from_path(
        cls, model_dir: str | Path, *, threads: int | None = None, session: Any = None
    ) -> OrtCausalLMBackend:
        """Load ``model_dir/model_kv.onnx``, or export one from a Hugging Face directory.

        ``session``: the KV-cache graph already open (a plug-in's, e.g. decrypted in memory).

        Raises:
            ServingError: no config.json, or neither a KV graph nor torch weights to export.
        """
        from transformers import AutoConfig, GenerationConfig

        path = Path(model_dir)
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ServingError(
                f"cannot read the model config in '{path}': {exc}",
                hint="serve a directory with config.json (save_pretrained or kiln optimize)",
            ) from exc
        try:
            gen_config: Any = GenerationConfig.from_pretrained(str(path))
        except OSError:
            gen_config = None
        tmp: Path | None = None
        graph = path / KV_ONNX
        if session is None and not graph.is_file():
            if not has_torch_weights(path):
                raise ServingError(
                    f"'{path}' has no {KV_ONNX} and no torch weights to export one from",
                    hint="re-run `kiln optimize` with optimize.quant.kv_cache: true (the "
                    "default), or serve the fp32 model directory",
                )
            tmp = Path(tempfile.mkdtemp(prefix="kiln-kv-serve-"))
            graph = tmp / KV_ONNX
            try:
                export_kv_graph(path, graph)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        backend = cls(graph, config, threads=threads, generation_config=gen_config, session=session)
        if tmp is not None:
            backend._tmp = tmp
            weakref.finalize(backend, shutil.rmtree, tmp, True)
        return backend

    # ------------------------------------------------------------------ state
    @property
    def rows(self) -> list[str]:
        """Request ids currently in the KV cache, in row order."""
        return list(self._rows)

    @property
    def adapters(self) -> list[str]:
        """Runtime adapters: none on this backend."""
        return []

    @property
    def vocab_size(self) -> int:
        """Width of the logits this backend returns."""
        return self._vocab

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Always refused: the ONNX graph has its weights folded in.

        Raises:
            ServingError: always.
        """
        raise ServingError(
            f"cannot load adapter {name!r}: the onnx generation backend serves a fixed graph",
            hint="serve the base model with backend: torch to load LoRA adapters at run time",
        )

    def unload_adapter(self, name: str) -> None:
        """Always refused (no adapter is ever loaded here).

        Raises:
            ServingError: always.
        """
        raise ServingError(f"no adapter named {name!r} is loaded", hint="see GET /admin/adapters")

    def reset(self) -> None:
        """Drop every sequence and the whole cache."""
        import numpy as np

        self._rows, self._past, self._width = [], {}, 0
        self._lengths = np.zeros(0, dtype=np.int64)

    def release(self, request_ids: Sequence[str]) -> None:
        """Free the cache rows of ``request_ids`` (unknown ids are ignored)."""
        import numpy as np

        drop = set(request_ids)
        keep = [i for i, rid in enumerate(self._rows) if rid not in drop]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self.reset()
            return
        index = np.asarray(keep, dtype=np.int64)
        self._rows = [self._rows[i] for i in keep]
        self._lengths = self._lengths[index]
        width = int(self._lengths.max())
        cut = self._width - width  # leading columns that are padding for every kept row
        self._past = {n: np.ascontiguousarray(t[index, :, cut:]) for n, t in self._past.items()}
        self._width = width

    # ------------------------------------------------------------------ steps
    def prefill(
        self,
        requests: Sequence[tuple[str, Sequence[int]]],
        adapters: dict[str, str] | None = None,
    ) -> torch.Tensor:
        """Run the prompts of new sequences and add them to the batch.

        Returns:
            fp32 logits of each prompt's last position, ``[len(requests), vocab]``.

        Raises:
            ServingError: a request names an adapter.
        """
        import numpy as np
        import torch

        if adapters:
            raise ServingError(
                f"adapter {next(iter(adapters.values()))!r} is not loaded on the onnx backend",
                hint="serve the base model with backend: torch to use adapters",
            )
        assert not {rid for rid, _ in requests} & set(self._rows), "request already in batch"
        parts: list[tuple[list[str], np.ndarray, dict[str, np.ndarray], int]] = []
        logits: dict[str, np.ndarray] = {}
        for group in length_groups(requests):
            rids, lengths, past, width, group_logits = self._prefill_group(group)
            parts.append((rids, lengths, past, width))
            logits.update(zip(rids, group_logits, strict=True))
        self._join(parts)
        return torch.from_numpy(np.stack([logits[rid] for rid, _ in requests]))

    def decode(self, request_ids: Sequence[str], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to every sequence in the batch; returns fp32 logits ``[B, vocab]``.

        ``request_ids`` must name exactly the sequences in the batch; the logits
        come back in the order of ``request_ids``.
        """
        import numpy as np
        import torch

        assert sorted(request_ids) == sorted(self._rows), "decode must cover the whole batch"
        row_of = {rid: i for i, rid in enumerate(self._rows)}
        order = [row_of[rid] for rid in request_ids]
        ids = np.empty((len(self._rows), 1), dtype=np.int64)
        ids[order, 0] = tokens
        lengths = self._lengths
        mask = left_pad_mask(lengths + 1, self._width + 1)
        logits, self._past = self._run(ids, mask, lengths[:, None], self._past)
        self._lengths = lengths + 1
        self._width += 1
        if order != list(range(len(order))):
            logits = logits[order]
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))

    def warmup(self) -> None:
        """One prefill and one decode on a throw-away sequence (first calls are slow)."""
        rid = "__warmup__"
        logits = self.prefill([(rid, [self._pad_id, self._pad_id])])
        self.decode([rid], [int(logits[0].argmax())])
        self.release([rid])

    # ---------------------------------------------------------------- helpers
    def _run(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        past: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One graph call: last-position logits ``[B, V]`` and the new past."""
        if not past:
            import numpy as np

            empty = np.zeros((ids.shape[0], self._heads, 0, self._head_dim), dtype=self._dtype)
            past = dict.fromkeys(self.past_names, empty)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        outs = self.session.run(None, feed)
        present = dict(zip(self._present, outs[1:], strict=True))
        return outs[0][:, -1, :], present

    def _prefill_group(
        self, group: Sequence[tuple[str, Sequence[int]]]
    ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], int, np.ndarray]:
        import numpy as np

        lengths = np.asarray([len(p) for _, p in group], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((len(group), width), self._pad_id, dtype=np.int64)
        for i, (_, prompt) in enumerate(group):
            ids[i, width - len(prompt) :] = prompt
        mask = left_pad_mask(lengths, width)
        logits, past = self._run(ids, mask, positions_from_mask(mask, width), {})
        if bool((lengths < width).any()):
            keep = mask.astype(bool)[:, None, :, None]  # padded K/V may be NaN; 0 * NaN = NaN
            past = {n: np.where(keep, t, 0).astype(t.dtype) for n, t in past.items()}
        return [rid for rid, _ in group], lengths, past, width, logits.astype(np.float32)

    def _join(self, parts: list[tuple[list[str], np.ndarray, dict[str, np.ndarray], int]]) -> None:
        """Add prefilled groups to the batch: one copy of the cache, however many groups."""
        import numpy as np

        if self._rows:
            parts = [(self._rows, self._lengths, self._past, self._width), *parts]
        width = max(part[3] for part in parts)
        if len(parts) == 1:
            self._past = parts[0][2]
        else:
            self._past = {
                n: stack_left_padded([part[2][n] for part in parts], width) for n in self.past_names
            }
        self._rows = [rid for part in parts for rid in part[0]]
        self._lengths = np.concatenate([part[1] for part in parts])
        self._width = width


def left_pad_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """int64 ``[B, width]``: 1 on the last ``lengths[i]`` columns of row ``i``."""
    import numpy as np

    cols = np.arange(width)
    return (cols[None, :] >= (width - lengths)[:, None]).astype(np.int64)


def stack_left_padded(arrays: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Stack ``[b_i, H, l_i, D]`` arrays into ``[sum b_i, H, width, D]``, right-aligned."""
    import numpy as np

    first = arrays[0]
    total = sum(a.shape[0] for a in arrays)
    out = np.zeros((total, first.shape[1], width, first.shape[3]), dtype=first.dtype)
    row = 0
    for a in arrays:
        out[row : row + a.shape[0], :, width - a.shape[2] :] = a
        row += a.shape[0]
    return out
