"""Hugging Face model and tokenizer folders: what they hold and how every stage loads them.

:class:`ModelInfo` is what a stage needs to know about a model folder (task,
architecture, inputs, sizes), read from ``config.json`` without loading the
weights. ``torch`` and ``transformers`` are imported inside the functions.

Example:
    >>> spec = inspect_model("runs/q/train/model")
    >>> model = load_torch_model(spec)
    >>> tok = load_tokenizer("runs/q/tokenizer")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkiln.artifacts import Artifact
from modelkiln.contract import TOKENIZER_DIR, TOKENIZER_JSON
from modelkiln.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["ModelInfo", "Task", "auto_class", "inspect_model", "load_tokenizer", "load_torch_model"]

Task = Literal["encoder", "causal-lm"]


@dataclass(frozen=True)
class ModelInfo:
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


def inspect_model(model_dir: str | Path, task: Literal["auto", Task] = "auto") -> ModelInfo:
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
    return ModelInfo(
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
    spec: ModelInfo,
    path: Path | None = None,
    dtype: torch.dtype | str | None = "float32",
    **kwargs: Any,
) -> PreTrainedModel:
    """Load ``path`` (default: the spec's directory) in eval mode on the CPU.

    ``dtype=None`` keeps the checkpoint's dtype (default fp32); ``kwargs`` go to
    ``from_pretrained``.
    """
    import torch

    if isinstance(dtype, str):  # a name, so importing this module stays torch-free
        dtype = getattr(torch, dtype)
    extra = {"dtype": dtype} if dtype is not None else {}
    model = auto_class(spec.task).from_pretrained(path or spec.path, **extra, **kwargs)
    return model.eval()


def load_tokenizer(source: str | Path | Artifact) -> PreTrainedTokenizerFast:
    """Load a saved fast tokenizer from its folder, a tokenizer stage directory or its artifact.

    Raises:
        ArtifactError: no ``tokenizer.json`` there.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = source.path if isinstance(source, Artifact) else Path(source)
    if not (path / TOKENIZER_JSON).is_file() and (path / TOKENIZER_DIR).is_dir():
        path = path / TOKENIZER_DIR
    if not (path / TOKENIZER_JSON).is_file():
        raise ArtifactError(
            f"{path} holds no tokenizer (no {TOKENIZER_JSON})",
            hint="pass the tokenizer folder or run the 'tokenizer' stage",
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ArtifactError(f"{path} did not load as a fast tokenizer", hint="re-run the stage")
    return tok
