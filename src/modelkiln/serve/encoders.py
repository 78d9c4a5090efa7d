"""Execution layer for encoders: PyTorch and ONNX Runtime backends of the embedding engine.

Both pool the last hidden state the way the model's sentence-transformers
files say (``1_Pooling/config.json``: mean by default, or CLS) and L2-normalize
when ``modules.json`` lists a Normalize layer — all-MiniLM-L6-v2's recipe. A
plain Hugging Face encoder directory without those files gets mean pooling +
normalization.

Example:
    >>> backend = TorchEncoderBackend.from_path(minilm_dir)
    >>> ids = backend.tokenizer(["hello"])["input_ids"]
    >>> backend.encode(ids).shape
    (1, 384)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkiln.errors import DependencyMissingError, ServingError
from modelkiln.hardware import (
    Precision,
    confirm_bf16_output,
    model_matmul_shape,
    precision_decision,
    torch_dtype,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector."""

    mode: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int | None = None  # sentence-transformers' max_seq_length, if given

    @classmethod
    def from_dir(cls, model_dir: Path) -> Pooling:
        """Read the sentence-transformers files of ``model_dir`` (defaults when absent)."""
        mode: Literal["mean", "cls"] = "mean"
        pooling_cfg = model_dir / "1_Pooling" / "config.json"
        if pooling_cfg.is_file():
            data = json.loads(pooling_cfg.read_text(encoding="utf-8"))
            if data.get("pooling_mode_cls_token") and not data.get("pooling_mode_mean_tokens"):
                mode = "cls"
        normalize = True
        modules = model_dir / "modules.json"
        if modules.is_file():
            types = [m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8"))]
            normalize = any(t.endswith("Normalize") for t in types)
        max_length = None
        st_cfg = model_dir / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_length = json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length")
        return cls(mode, normalize, max_length)

    def apply(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``[B, T, D]`` states and ``[B, T]`` mask -> ``[B, D]`` float32 vectors."""
        import numpy as np

        if self.mode == "cls":
            out = hidden[:, 0, :]
        else:
            m = mask[:, :, None].astype(hidden.dtype)
            out = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        out = out.astype(np.float32)
        if self.normalize:
            out /= np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return out


def pad_batch(batch: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token ids to the longest: (``input_ids``, ``attention_mask``), int64 ``[B, T]``."""
    import numpy as np

    width = max((len(s) for s in batch), default=1)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


class LightTokenizer:
    """The part of a transformers fast tokenizer the encoder path uses, on ``tokenizers`` alone.

    Why hand-written: ``from transformers import AutoTokenizer`` imports torch
    (2.5 s on the reference 2-core CPU), which alone would spend half of the
    5 s cold-start budget of an ONNX encoder that needs no torch at all. It
    reads the same ``tokenizer.json`` (so ids are the fast tokenizer's,
    special tokens included; a test compares them on MiniLM) and switches off
    the truncation / padding that file may carry, as transformers does.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        config: the directory's ``tokenizer_config.json`` (pad token, max length).
    """

    def __init__(self, tokenizer: Any, config: dict[str, Any]) -> None:
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        pad = config.get("pad_token")
        if isinstance(pad, dict):  # AddedToken serialized as a dict
            pad = pad.get("content")
        self.pad_token_id: int | None = tokenizer.token_to_id(pad) if pad else None
        limit = config.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, int | float) else 1_000_000_000

    @classmethod
    def from_dir(cls, model_dir: Path) -> LightTokenizer:
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``) of ``model_dir``."""
        from tokenizers import Tokenizer

        config_file = model_dir / "tokenizer_config.json"
        config = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        return cls(Tokenizer.from_file(str(model_dir / "tokenizer.json")), config)

    def __call__(
        self, texts: str | list[str], add_special_tokens: bool = True
    ) -> dict[str, list[Any]]:
        """``{"input_ids": ...}`` for one text (a list of ids) or a batch (a list of lists)."""
        if isinstance(texts, str):
            return {"input_ids": self._tok.encode(texts, add_special_tokens=add_special_tokens).ids}
        encoded = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return dict(self._tok.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))


def _load_tokenizer(model_dir: Path, light: bool = False) -> Any:
    """The directory's tokenizer (``light``: a :class:`LightTokenizer` if tokenizer.json exists)."""
    if light and (model_dir / "tokenizer.json").is_file():
        try:
            return LightTokenizer.from_dir(model_dir)
        except Exception as exc:  # boundary: tokenizers raises plain Exceptions on bad files
            raise ServingError(
                f"cannot load the tokenizer from '{model_dir}': {exc}",
                hint="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
            ) from exc
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ServingError(
            f"cannot load the tokenizer from '{model_dir}': {exc}",
            hint="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
        ) from exc


def _max_length(tokenizer: Any, pooling: Pooling, config_limit: int | None) -> int:
    limits = [pooling.max_length, config_limit]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 1_000_000:
        limits.append(tok_limit)
    known = [int(x) for x in limits if x]
    return min(known) if known else 512


class TorchEncoderBackend:
    """A transformers encoder (``AutoModel``) run with torch under ``inference_mode``.

    Args:
        model: the encoder, on CPU, in its serving dtype.
        tokenizer: its tokenizer.
        pooling: pooling and normalization.
        compile: run the forward pass through ``torch.compile(dynamic=True)`` (one graph
            for every batch shape; the first call compiles for tens of seconds).
    """

    def __init__(
        self, model: Any, tokenizer: Any, pooling: Pooling | None = None, *, compile: bool = False
    ) -> None:
        self.model = model.eval()
        self.compiled = compile
        self._forward: Any = self.model
        if compile:
            import torch

            self._forward = torch.compile(self.model, dynamic=True)
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.pooling = pooling or Pooling()
        self.dim = int(model.config.hidden_size)
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = _max_length(tokenizer, self.pooling, limit)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    @classmethod
    def from_path(
        cls,
        model_dir: str | Path,
        precision: Precision = "auto",
        device: str | None = None,
        *,
        compile: bool = False,
        loader: Callable[[Path], Any] | None = None,
    ) -> TorchEncoderBackend:
        """Load an encoder saved with ``save_pretrained`` plus its tokenizer.

        ``loader`` (a plug-in's, e.g. encrypted weights) is asked first for the model.

        ``device`` defaults to CUDA when available, else CPU; ``precision="auto"``
        picks bf16 only where it is fast (fp32 on AVX2-only CPUs).

        Raises:
            ServingError: the directory holds no loadable encoder or tokenizer.
        """
        from transformers import AutoModel

        from modelkiln.hardware import device_name

        path = Path(model_dir)
        device = device or device_name()
        decision = precision_decision(precision, device, model_matmul_shape(path))
        # auto: load fp32 so a bf16 choice can be checked against it on this model.
        dtype = torch_dtype("fp32" if precision == "auto" else decision.value)
        try:
            model = loader(path) if loader is not None else None
            if model is None:
                model = AutoModel.from_pretrained(str(path), dtype=dtype)
            model = model.to(dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ServingError(
                f"cannot load an encoder from '{path}': {exc}",
                hint="pass a directory written by save_pretrained (config.json + weights)",
            ) from exc
        if precision == "auto":
            decision = confirm_bf16_output(decision, model, _probe_inputs(model))
        log.info("encoder %s runs in %s: %s", path.name, decision.value, decision.reason)
        model = model.to(device=device, dtype=torch_dtype(decision.value))
        # The light tokenizer on torch too: same ids, and transformers' Python wrapper
        # around the Rust tokenizer was ~1/6 of the event loop's CPU under load.
        tokenizer = _load_tokenizer(path, light=True)
        return cls(model, tokenizer, Pooling.from_dir(path), compile=compile)

    def encode(self, batch: list[list[int]]) -> np.ndarray:
        """Embed a batch of token-id sequences (right-padded here)."""
        import torch

        ids, mask = pad_batch(batch, self.pad_id)
        with torch.inference_mode():
            mask_t = torch.from_numpy(mask).to(self.device)
            out = self._forward(
                input_ids=torch.from_numpy(ids).to(self.device), attention_mask=mask_t
            )
            hidden = out.last_hidden_state.float()  # [B, T, D]
            if self.pooling.mode == "cls":
                vectors = hidden[:, 0]
            else:
                m = mask_t.unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.pooling.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
            return vectors.cpu().numpy()

    def warmup(self) -> None:
        """Two small forward passes (the first one allocates)."""
        for n in (1, 2):
            self.encode([[self.pad_id] * 8] * n)


class OnnxEncoderBackend:
    """An encoder exported to ONNX (``model.onnx`` + tokenizer) run with onnxruntime.

    The graph's first output must be the last hidden state ``[B, T, D]``.
    """

    def __init__(
        self, session: Any, tokenizer: Any, pooling: Pooling, max_length: int | None = None
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.pooling = pooling
        self._inputs = [i.name for i in session.get_inputs()]
        unknown = sorted(set(self._inputs) - {"input_ids", "attention_mask", "token_type_ids"})
        if unknown:
            raise ServingError(
                f"the ONNX graph has inputs this backend cannot feed: {unknown}",
                hint="export with inputs input_ids, attention_mask (and token_type_ids)",
            )
        shape = session.get_outputs()[0].shape
        if not isinstance(shape[-1], int):
            raise ServingError(
                "the ONNX graph's first output has no fixed hidden size",
                hint="export the encoder with last_hidden_state [batch, seq, hidden] first",
            )
        self.dim = int(shape[-1])
        self.max_length = _max_length(tokenizer, pooling, max_length)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    @classmethod
    def from_path(
        cls, model_dir: str | Path, threads: int | None = None, onnx_file: Path | None = None
    ) -> OnnxEncoderBackend:
        """Load ``model.onnx`` (or the only ``*.onnx``) of ``model_dir`` and its tokenizer.

        ``onnx_file``: a graph stored elsewhere (the engine cache of :mod:`.autoengine`);
        the tokenizer, pooling and limits still come from ``model_dir``.

        Raises:
            DependencyMissingError: onnxruntime is not installed.
            ServingError: no ONNX file, or it cannot be loaded.
        """
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise DependencyMissingError("onnxruntime", "onnx", purpose="ONNX serving") from exc
        from modelkiln.onnxrt import cpu_session

        path = Path(model_dir)
        onnx_file = onnx_file or find_onnx(path)
        if onnx_file is None:
            raise ServingError(
                f"no .onnx file in '{path}'", hint="export the encoder (kiln optimize) first"
            )
        try:
            session = cpu_session(onnx_file, threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ServingError(f"cannot load '{onnx_file}': {exc}") from exc
        return cls.from_session(path, session)

    @classmethod
    def from_session(cls, model_dir: str | Path, session: Any) -> OnnxEncoderBackend:
        """Wrap an open ONNX Runtime session (e.g. a graph a plug-in decrypted in memory);
        the tokenizer, pooling and length limit come from ``model_dir``."""
        path = Path(model_dir)
        limit = None
        config = path / "config.json"
        if config.is_file():
            limit = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
        return cls(session, _load_tokenizer(path, light=True), Pooling.from_dir(path), limit)

    def encode(self, batch: list[list[int]]) -> np.ndarray:
        """Embed a batch of token-id sequences."""
        import numpy as np

        ids, mask = pad_batch(batch, self.pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self.session.run(None, {k: feeds[k] for k in self._inputs})[0]
        return self.pooling.apply(np.asarray(hidden), mask)

    def warmup(self) -> None:
        """Two small forward passes."""
        for n in (1, 2):
            self.encode([[self.pad_id] * 8] * n)


def find_onnx(model_dir: Path) -> Path | None:
    """``model.onnx`` in ``model_dir``, else its only ``*.onnx`` file, else None."""
    preferred = model_dir / "model.onnx"
    if preferred.is_file():
        return preferred
    found = sorted(model_dir.glob("*.onnx"))
    return found[0] if len(found) == 1 else None


def _probe_inputs(model: Any) -> dict[str, Any]:
    """16 fixed random token ids for the bf16 output check."""
    import torch

    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(min(5, vocab - 1), vocab, (1, 16), generator=gen)}
