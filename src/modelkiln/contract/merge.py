"""Adapter merge with a parity check and an atomic save: the one copy every stage uses.

The train stage merges its own adapter (``kiln train merge``), the optimize
stage merges an adapter it is given; both go through :func:`merge_checked`:
merged logits (or hidden states) must match base + adapter within ``atol`` on a
probe batch, in memory and after reloading the saved folder, and the folder
appears (renamed into place) only when both checks pass.

Example:
    >>> report = merge_checked(peft_model, probe_ids, Path("out/merged"), atol=1e-4,
    ...                        reload=AutoModelForCausalLM, save_extra=tok.save_pretrained,
    ...                        report={"method": "LORA"})
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import read_train_json
from modelkiln.errors import ConfigError, QualityGateError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

MERGE_ATOL = 1e-4
"""Max |logit| difference between base + adapter and the merged model (fp32)."""
MERGE_JSON = "merge.json"
"""The merge facts written next to the merged model."""


def main_output(out: Any) -> Any:
    """Logits of a causal LM, else the last hidden state (encoders)."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def merge_checked(
    model: Any,
    ids: torch.Tensor,
    out: Path,
    *,
    atol: float,
    reload: Any,
    save_extra: Callable[[Path], object] | None = None,
    report: dict[str, Any] | None = None,
    what: str = "merged model",
) -> dict[str, Any]:
    """Merge a ``PeftModel``'s adapter into its base, check parity, save atomically to ``out``.

    Args:
        model: a ``peft.PeftModel`` in eval mode.
        ids: probe token ids ``(B, S)``.
        out: the folder to write (replaced when it exists).
        atol: the largest allowed max-abs difference of the main output.
        reload: the ``Auto*`` class that reloads the saved folder.
        save_extra: writes side files (the tokenizer) into the temporary folder.
        report: facts to record (e.g. the PEFT method); the diffs and ``atol`` are added.
        what: how error messages name the model.

    Returns:
        ``report`` plus ``max_abs_diff``, ``reload_max_abs_diff`` and ``atol`` (also
        written to ``out/merge.json``).

    Raises:
        QualityGateError: the merged or the reloaded outputs miss ``atol``.
    """
    import torch

    with torch.no_grad():
        reference = main_output(model(input_ids=ids))
        merged = model.merge_and_unload()
        diff = float((main_output(merged(input_ids=ids)) - reference).abs().max())
    if diff > atol:
        raise QualityGateError(
            f"{what} differs from base + adapter by {diff:.3g} (> atol {atol:g})",
            hint="serve base + adapter instead, or check the adapter",
        )
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    merged.save_pretrained(tmp)
    if save_extra is not None:
        save_extra(tmp)
    reloaded = reload.from_pretrained(str(tmp)).eval()
    with torch.no_grad():
        reload_diff = float((main_output(reloaded(input_ids=ids)) - reference).abs().max())
    if reload_diff > atol:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QualityGateError(
            f"reloaded {what} differs from base + adapter by {reload_diff:.3g}",
            hint="check the saved files",
        )
    facts = dict(report or {}) | {
        "max_abs_diff": diff,
        "reload_max_abs_diff": reload_diff,
        "atol": atol,
    }
    (tmp / MERGE_JSON).write_text(json.dumps(facts, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return facts


def load_trained(path: str | Path, *, merged: bool = False) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a train artifact's model (base + adapter as a ``PeftModel`` when it has one).

    Args:
        path: the train artifact directory.
        merged: merge the adapter into the base and return a plain HF model.

    Raises:
        ArtifactError: the directory is not a train artifact.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    layout = read_train_json(root)
    base_ref = layout["model"]
    base_path = root / base_ref if (root / base_ref).is_dir() else Path(base_ref)
    source = str(base_path) if base_path.is_dir() else base_ref
    model: Any = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(root / layout["tokenizer"]))
    if layout.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(root / layout["adapter"]))
        if merged:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


@dataclass
class MergeReport:
    """Result of :func:`merge_train_artifact`: where the merged model is and how close it is."""

    path: str
    method: str
    max_abs_diff: float
    reload_max_abs_diff: float
    atol: float


def merge_train_artifact(
    artifact: str | Path, out_dir: str | Path, *, atol: float = MERGE_ATOL
) -> MergeReport:
    """Merge a train artifact's adapter into its base and save a full HF model.

    The merged model's logits on a fixed probe batch must match base + adapter
    within ``atol`` (max abs difference, fp32), both in memory and after
    reloading the saved folder with plain ``transformers``. A QLoRA adapter is
    merged into the full-precision base (the 4-bit base is only for training).

    Raises:
        ConfigError: the artifact has no mergeable adapter (full model, prompt tuning).
        QualityGateError: the merged logits differ by more than ``atol``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    root, out = Path(artifact), Path(out_dir)
    model, tokenizer = load_trained(root)
    layout = read_train_json(root)
    if not layout.get("adapter"):
        raise ConfigError(f"{root} holds a full model: nothing to merge", hint="use model/ as is")
    if layout["method"] == "prompt_tuning":
        raise ConfigError(
            "a prompt-tuning adapter cannot be merged (its virtual tokens are inputs, not weights)",
            hint="serve it as base + adapter",
        )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (2, min(64, layout["block_size"])), generator=gen)
    facts = merge_checked(
        model,
        ids,
        out,
        atol=atol,
        reload=AutoModelForCausalLM,
        save_extra=tokenizer.save_pretrained,
        report={"path": str(out), "method": layout["method"]},
    )
    return MergeReport(
        str(out), layout["method"], facts["max_abs_diff"], facts["reload_max_abs_diff"], atol
    )
