"""Byte-level BPE tokenizer for Python source, with fill-in-the-middle tokens (stage ``tokenizer``).

The tokenizer is GPT-2 style: a byte-level pre-tokenizer (GPT-2 regex, no
prefix space), a byte-level decoder, and every one of the 256 bytes in the
base alphabet, so any text is representable and there is no ``<unk>`` token.
Special tokens have fixed ids 0-4:

====  =================  ===============================================
id    token              role
====  =================  ===============================================
0     ``<|endoftext|>``  ``eos_token`` and ``bos_token`` (document separator)
1     ``<pad>``          ``pad_token``
2     ``<fim_prefix>``   ``fim_prefix_token``  } fill-in-the-middle; also
3     ``<fim_middle>``   ``fim_middle_token``  } listed as additional /
4     ``<fim_suffix>``   ``fim_suffix_token``  } extra special tokens
====  =================  ===============================================

Encoding adds no BOS/EOS (there is no post-processor): callers that pack
documents append ``eos_token_id`` themselves. With that,
``tok.decode(tok.encode(text)) == text`` exactly for any text (CRLF, lone
``\\r``, tabs, form feeds, NUL, trailing spaces, any unicode). Text that
contains a special-token string (e.g. ``"<pad>"``) is encoded to that special
id; it still decodes back unless ``skip_special_tokens=True``, but that is not
part of the guarantee — pass ``split_special_tokens=True`` when encoding
untrusted text for training.

The saved folder needs only ``transformers``: ``AutoTokenizer.from_pretrained``
returns a fast tokenizer with ``fim_prefix_token_id`` etc. set.

Example:
    >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 50, TokenizerConfig(vocab_size=300))
    >>> tok.decode(tok.encode("x = 1\\r\\n")) == "x = 1\\r\\n"
    True
    >>> save_tokenizer(tok, Path("tok")); load_tokenizer("tok").fim_middle_token_id
    3
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.artifacts import Artifact
from modelkiln.contract import TOKENIZER_DIR
from modelkiln.contract.hfmodel import load_tokenizer
from modelkiln.data.config import TokenizerConfig
from modelkiln.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerFast

    from modelkiln.progress import Progress
    from modelkiln.stages import StageContext

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
FIM_PREFIX_TOKEN = "<fim_prefix>"
FIM_MIDDLE_TOKEN = "<fim_middle>"
FIM_SUFFIX_TOKEN = "<fim_suffix>"
#: Special tokens in id order (the trainer gives them ids 0, 1, 2, ...).
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, FIM_PREFIX_TOKEN, FIM_MIDDLE_TOKEN, FIM_SUFFIX_TOKEN)
#: Named special tokens beyond bos/eos/pad: become ``tok.fim_prefix_token(_id)`` etc.
FIM_TOKENS = {
    "fim_prefix_token": FIM_PREFIX_TOKEN,
    "fim_middle_token": FIM_MIDDLE_TOKEN,
    "fim_suffix_token": FIM_SUFFIX_TOKEN,
}
REPORT_PLOT = "tokenizer_bytes_per_token.png"
_BATCH = 256


def cap_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Yield ``texts`` in order until ``max_bytes`` UTF-8 bytes; the last one is cut to fit.

    Example:
        >>> list(cap_bytes(["abc", "déf", "ghi"], 5))
        ['abc', 'd']
    """
    budget = max_bytes
    for text in texts:
        if budget is None:
            yield text
            continue
        data = text.encode("utf-8")
        if len(data) >= budget:
            # A cut inside a multi-byte character drops that character.
            head = data[:budget].decode("utf-8", errors="ignore")
            if head:
                yield head
            return
        budget -= len(data)
        yield text


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (at most ``cfg.max_train_bytes`` of them).

    Args:
        texts: training documents, used in order (deterministic).
        cfg: vocabulary size (special tokens included), merge min frequency, max length.

    Returns:
        A fast tokenizer with the special tokens of the module docstring. The
        vocabulary is smaller than ``cfg.vocab_size`` when the texts allow no more merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(cap_bytes(texts, cfg.max_train_bytes), trainer)
    return _wrap(backend, cfg.model_max_length)


def _wrap(backend: Any, model_max_length: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(FIM_TOKENS),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.extra_special_tokens = list(FIM_TOKENS.values())
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), ids
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save ``tok`` so that plain ``AutoTokenizer.from_pretrained(directory)`` loads it.

    Writes ``tokenizer.json`` and ``tokenizer_config.json``; returns ``directory``.
    """
    path = Path(directory)
    tok.save_pretrained(str(path))
    # transformers 5 writes its own class name and an ``extra_special_tokens``
    # list; the 4.x spelling of both loads in transformers 4 and 5 alike.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list) and extra:
        config["additional_special_tokens"] = extra
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


@dataclass
class SplitStats:
    """Size of one corpus split in files, UTF-8 bytes and BPE tokens."""

    files: int = 0
    bytes: int = 0
    tokens: int = 0

    @property
    def bytes_per_token(self) -> float | None:
        """Compression: UTF-8 bytes per BPE token (None for an empty split)."""
        return round(self.bytes / self.tokens, 4) if self.tokens else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures, ``bytes_per_token`` included."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "bytes_per_token": self.bytes_per_token,
        }


def _batches(ds: Dataset) -> Iterator[tuple[list[str], list[str]]]:
    for batch in ds.select_columns(["path", "text"]).iter(batch_size=_BATCH):
        yield list(batch["path"]), list(batch["text"])


def _encode(tok: PreTrainedTokenizerFast, paths: list[str], texts: list[str]) -> list[list[int]]:
    try:
        ids: list[list[int]] = tok(
            texts, add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
    except TypeError:  # tokenizers rejects e.g. lone surrogates; find the file
        for path, text in zip(paths, texts, strict=True):
            try:
                tok(text, add_special_tokens=False)
            except TypeError as exc:
                raise DataError(
                    f"tokenizer cannot encode {path}: {exc}",
                    hint="fix or exclude that file in the data stage",
                ) from exc
        raise
    return ids


def _first_difference(a: str, b: str) -> int:
    pairs = zip(a, b, strict=False)
    return next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))


def check_split(
    tok: PreTrainedTokenizerFast, name: str, ds: Dataset, progress: Progress
) -> SplitStats:
    """Encode and decode every file of a split; count files, bytes and tokens.

    Raises:
        DataError: a file does not decode back to exactly its text (names the path).
    """
    stats = SplitStats()
    for paths, texts in _batches(ds):
        ids = _encode(tok, paths, texts)
        decoded = tok.batch_decode(ids)
        for path, text, back in zip(paths, texts, decoded, strict=True):
            if back != text:
                at = _first_difference(text, back)
                raise DataError(
                    f"tokenizer round trip fails on {path} ({name} split): "
                    f"decoded text differs at character {at} ({text[at : at + 20]!r} became "
                    f"{back[at : at + 20]!r})",
                    hint="this is a tokenizer bug; report it with that file",
                )
        stats.files += len(texts)
        stats.bytes += sum(len(t.encode("utf-8")) for t in texts)
        stats.tokens += sum(len(i) for i in ids)
        progress.advance("checking round trip", len(texts))
    return stats


def _load_corpus(artifact: Artifact) -> DatasetDict:
    from modelkiln.contract.corpus import load_corpus

    corpus = load_corpus(artifact, required=("train",))
    if corpus["train"].num_rows == 0:
        raise DataError(
            f"the train split of {artifact.path} is empty", hint="check data.source/exclude"
        )
    return corpus


def run_tokenizer_stage(ctx: StageContext) -> None:
    """Train, save and verify the tokenizer on the data artifact's corpus.

    Writes ``tokenizer/`` (a ``from_pretrained`` folder), ``report.md`` and
    ``tokenizer_bytes_per_token.png`` into ``ctx.out``.

    Raises:
        DataError: the corpus is unusable or a file fails the round trip.
    """
    cfg = ctx.config
    assert isinstance(cfg, TokenizerConfig), type(cfg)
    corpus = _load_corpus(ctx.inputs["data"])
    train_bytes = 0

    def counted(texts: Iterable[str]) -> Iterator[str]:
        nonlocal train_bytes
        for text in texts:
            train_bytes += len(text.encode("utf-8"))
            yield text

    ctx.progress.start("training tokenizer", None)
    start = time.perf_counter()
    raw = (t for _, batch in _batches(corpus["train"]) for t in batch)
    tok = train_tokenizer(counted(cap_bytes(raw, cfg.max_train_bytes)), cfg)
    train_seconds = time.perf_counter() - start
    ctx.progress.finish("training tokenizer")
    save_tokenizer(tok, ctx.out / TOKENIZER_DIR)
    saved = load_tokenizer(ctx.out / TOKENIZER_DIR)  # check what consumers will load

    total = sum(split.num_rows for split in corpus.values())
    ctx.progress.start("checking round trip", total)
    splits = {name: check_split(saved, name, corpus[name], ctx.progress) for name in corpus}
    ctx.progress.finish("checking round trip")

    validation = splits.get("validation")
    ctx.metrics.update(
        {
            "vocab_size": len(saved),
            "validation_bytes_per_token": validation.bytes_per_token if validation else None,
            "roundtrip_failures": 0,
            "train_seconds": round(train_seconds, 3),
            "roundtrip_files_checked": sum(s.files for s in splits.values()),
            "train_bytes": train_bytes,
            "special_token_ids": {t: saved.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
            "splits": {name: s.as_dict() for name, s in splits.items()},
        }
    )
    _plot(splits, ctx.out / REPORT_PLOT)
    (ctx.out / "report.md").write_text(render_report(ctx.metrics), encoding="utf-8")


def _plot(splits: dict[str, SplitStats], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in splits.items() if s.bytes_per_token is not None]
    values = [splits[n].bytes_per_token or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(5, 3))
    bars = ax.bar(names, values, color="#4f81bd")
    ax.bar_label(bars, fmt="%.2f")
    ax.margins(y=0.15)
    ax.set_ylabel("UTF-8 bytes per BPE token")
    ax.set_title("Tokenizer compression by split")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_report(metrics: dict[str, Any]) -> str:
    """The stage's ``report.md``: a table of split sizes and compression, then the plot."""
    ids = ", ".join(f"`{t}`={i}" for t, i in metrics["special_token_ids"].items())
    lines = [
        "## Tokenizer",
        "",
        f"Byte-level BPE, vocabulary {metrics['vocab_size']} (special tokens: {ids}), "
        f"trained on {metrics['train_bytes']:,} bytes in {metrics['train_seconds']:.1f} s. "
        f"Exact round trip checked on {metrics['roundtrip_files_checked']} files: "
        f"{metrics['roundtrip_failures']} failures.",
        "",
        "| split | files | bytes | BPE tokens | bytes/token |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in metrics["splits"].items():
        bpt = "—" if s["bytes_per_token"] is None else f"{s['bytes_per_token']:.3f}"
        lines.append(f"| {name} | {s['files']} | {s['bytes']:,} | {s['tokens']:,} | {bpt} |")
    lines += ["", f"![bytes per token by split]({REPORT_PLOT})"]
    return "\n".join(lines) + "\n"
