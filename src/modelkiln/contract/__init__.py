"""The artifact contract: the file names every stage writes and the readers every stage uses.

A stage writes its outputs into ``<runs_dir>/<run>/<stage>/`` (see
:mod:`modelkiln.artifacts`); the names below are the only spelling of what lies
there, so a stage reads another stage's output through this module and never
through that stage's internals. Torch-free: the readers here parse JSON and
check paths; the heavier mechanisms live in the submodules
(:mod:`.corpus`, :mod:`.hfmodel`, :mod:`.merge`, :mod:`.codesearch`) and in the
core modules :mod:`modelkiln.kvgraph`, :mod:`modelkiln.onnxexport`,
:mod:`modelkiln.onnxrt` and :mod:`modelkiln.stats`.

Example:
    >>> model, adapter = train_model(Path("runs/quickstart/train"))
    >>> read_variant_json(Path("runs/quickstart/optimize/model"))["variant"]
    'onnx-int8-dynamic'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkiln.artifacts import MANIFEST
from modelkiln.errors import ArtifactError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_DIR",
    "CORPUS_DIR",
    "EVAL_CARD",
    "HUMANEVAL_DIR",
    "KV_ONNX",
    "MANIFEST",
    "MODEL_DIR",
    "MODEL_ONNX",
    "PAIRS_DIR",
    "REPORT_MD",
    "REQUESTS_JSON",
    "SERVE_JSON",
    "SOURCE_DIR",
    "TOKENIZER_DIR",
    "TOKENIZER_JSON",
    "TRAIN_JSON",
    "VARIANT_JSON",
    "has_kv_graph",
    "is_hf_model_dir",
    "read_train_json",
    "read_variant_json",
    "train_model",
    "write_variant_json",
]

# data stage (runs/<run>/data/)
CORPUS_DIR = "corpus"
"""``datasets`` DatasetDict (train / validation / test) of source files."""
PAIRS_DIR = "pairs"
"""``datasets`` DatasetDict of (docstring -> code) code-search pairs."""
HUMANEVAL_DIR = "humaneval"
"""``datasets`` Dataset of the HumanEval problems."""

# tokenizer stage (runs/<run>/tokenizer/)
TOKENIZER_DIR = "tokenizer"
"""A ``save_pretrained`` fast tokenizer folder (inside the tokenizer and train artifacts)."""
TOKENIZER_JSON = "tokenizer.json"
"""The file that makes a folder a fast tokenizer."""

# train stage (runs/<run>/train/)
TRAIN_JSON = "train.json"
"""Layout of a train artifact: ``{"model": ..., "adapter": ... | null, "tokenizer": ...}``."""
MODEL_DIR = "model"
"""Full HF model folder (train artifact), or the promoted variant (optimize artifact)."""
ADAPTER_DIR = "adapter"
"""PEFT adapter folder of a train artifact (absent for full fine-tuning)."""
ADAPTER_CONFIG = "adapter_config.json"
"""The file that makes a folder a PEFT adapter."""

# optimize stage (runs/<run>/optimize/, and every variant directory)
VARIANT_JSON = "variant.json"
"""What a variant directory holds: variant name, backend, task, files."""
EVAL_CARD = "eval_card.json"
"""Quality / speed / size / parity figures of a variant against its reference."""
MODEL_ONNX = "model.onnx"
"""The cache-free ONNX graph of an ONNX variant."""
KV_ONNX = "model_kv.onnx"
"""The KV-cache ONNX graph of a causal-LM ONNX variant (see :mod:`modelkiln.kvgraph`)."""
SOURCE_DIR = "source"
"""The fp32 HF model the optimize stage built its variants from (after an adapter merge)."""

# monitor: the reference profile next to the model it belongs to
MONITOR_PROFILE_DIR = "monitor_profile"
"""Folder of a model's reference profile (JSON + .npy arrays, see :mod:`modelkiln.monitor`)."""
MONITOR_PROFILE_JSON = "profile.json"
"""The profile's JSON inside :data:`MONITOR_PROFILE_DIR`."""

# serve / bench stage reports
SERVE_JSON = "serve.json"
"""The serve stage's config and every load-test summary."""
REQUESTS_JSON = "requests.json"
"""Per-request TTFT / TPOT / latency / status of every load-test run."""
REPORT_MD = "report.md"
"""A stage's own markdown report (included in the run report)."""


def _read_json(file: Path, what: str, hint: str) -> dict[str, Any]:
    if not file.is_file():
        raise ArtifactError(f"{file.parent} is not {what} (no {file.name})", hint=hint)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file} is not valid JSON ({exc})", hint=hint) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{file} is not a JSON object", hint=hint)
    return data


def read_train_json(train_dir: str | Path) -> dict[str, Any]:
    """The layout (``train.json``) of a train artifact.

    Raises:
        ArtifactError: ``train_dir`` is not a train artifact.
    """
    return _read_json(Path(train_dir) / TRAIN_JSON, "a train artifact", "run the train stage")


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (has ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def train_model(train_dir: str | Path) -> tuple[Path, Path | None]:
    """``(model folder, adapter folder or None)`` of a train artifact.

    Raises:
        ArtifactError: the artifact holds no ``model/config.json``.
    """
    root = Path(train_dir)
    model = root / MODEL_DIR
    if not is_hf_model_dir(model):
        raise ArtifactError(
            f"the train artifact '{root}' holds no {MODEL_DIR}/config.json",
            hint="re-run the train stage",
        )
    adapter = root / ADAPTER_DIR
    return model, adapter if (adapter / ADAPTER_CONFIG).is_file() else None


def write_variant_json(out: Path, info: dict[str, Any]) -> None:
    """Record what a variant directory holds (read back by :func:`read_variant_json`)."""
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    (Path(out) / VARIANT_JSON).write_text(text, encoding="utf-8")


def read_variant_json(path: str | Path) -> dict[str, Any]:
    """The ``variant.json`` of a variant directory.

    Raises:
        ArtifactError: the directory is not a variant written by modelkiln.
    """
    file = Path(path) / VARIANT_JSON
    if not file.is_file():
        raise ArtifactError(
            f"{path} is not an optimized variant (no {VARIANT_JSON})",
            hint="pass a directory written by modelkiln.optimize",
        )
    info: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return info


def has_kv_graph(variant_dir: str | Path) -> bool:
    """Whether a variant directory ships the KV-cache graph (``model_kv.onnx``)."""
    return (Path(variant_dir) / KV_ONNX).is_file()
