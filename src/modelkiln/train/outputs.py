"""Writing a phase's finished model and the train artifact's files (names from the contract).

Artifact layout (``out``)::

    model/            full HF model (safetensors) + its tokenizer: the final model of a
                      full phase, or the base an adapter applies to when that base was
                      trained (or initialised) in this run
    adapter/          PEFT adapter (safetensors + adapter_config.json) of a PEFT phase
    tokenizer/        the tokenizer used (from_pretrained folder)
    train.json        {"model": "model" | an HF id | an absolute folder,
                       "adapter": "adapter" | null, "tokenizer": "tokenizer",
                       "method": ..., "block_size": ...}
    log_history.json  Trainer log history of each phase
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from modelkiln.contract import ADAPTER_DIR, MODEL_DIR, TOKENIZER_DIR, TRAIN_JSON
from modelkiln.train.engine import COMPLETE
from modelkiln.train.models import resolve_source

PHASE_FILES = (COMPLETE, "outcome.json", "log_history.json")


def save_final(
    model: Any,
    final: Path,
    tokenizer: Any,
    record: dict[str, Any],
    log_history: list[dict[str, Any]],
    *,
    is_peft: bool,
    adapter_base: str,
) -> None:
    """Save a finished phase: weights (adapter or full model), its numbers, then the marker.

    ``adapter_base`` goes into ``adapter_config.json`` as ``base_model_name_or_path``.
    """
    if final.exists():
        shutil.rmtree(final)
    if is_peft:
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = adapter_base
    else:
        model.config.use_cache = True  # Trainer turns it off under activation checkpointing
        tokenizer.save_pretrained(final)
    with warnings.catch_warnings():  # peft looks for the base's config at its future path
        warnings.filterwarnings("ignore", message="Could not find a config file")
        model.save_pretrained(final)
    (final / "outcome.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (final / "log_history.json").write_text(json.dumps(log_history), encoding="utf-8")
    (final / COMPLETE).write_text(json.dumps({"phase": record["name"]}), encoding="utf-8")


def copy_model(src: Path, dst: Path) -> None:
    """Copy a saved model folder without the phase bookkeeping files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*PHASE_FILES), dirs_exist_ok=True)


def write_outputs(
    out: Path,
    *,
    tokenizer: Any,
    final: Path,
    adapter: bool,
    base_dir: Path | None,
    source: str,
    method: str,
    block_size: int,
    histories: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Copy the last phase's result into ``out`` and write ``train.json``; return the layout.

    Args:
        final: the last phase's finished folder.
        adapter: the last phase trained a PEFT adapter.
        base_dir: the adapter's base when this run produced it (copied to ``model/``).
        source: the configured model source (referenced when the base is external).
    """
    model_ref = MODEL_DIR
    if adapter:
        copy_model(final, out / ADAPTER_DIR)
        if base_dir is not None:
            copy_model(base_dir, out / MODEL_DIR)
            tokenizer.save_pretrained(out / MODEL_DIR)
        else:
            local = Path(resolve_source(source))
            model_ref = str(local.resolve()) if local.is_dir() else source
    else:
        copy_model(final, out / MODEL_DIR)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    layout = {
        "model": model_ref,
        "adapter": ADAPTER_DIR if adapter else None,
        "tokenizer": TOKENIZER_DIR,
        "method": method,
        "block_size": block_size,
    }
    (out / TRAIN_JSON).write_text(json.dumps(layout, indent=2), encoding="utf-8")
    (out / "log_history.json").write_text(json.dumps(histories), encoding="utf-8")
    return layout
