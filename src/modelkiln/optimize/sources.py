"""What ``optimize`` accepts as input, turned into one fp32 HF model directory.

* an HF model directory (``config.json`` + weights): used as is;
* a train-stage artifact (``train.json``): its full model, or its adapter merged
  into its base with :func:`modelkiln.contract.merge.merge_train_artifact` (logit parity checked);
* a PEFT adapter directory (``adapter_config.json``): merged into the base it
  names, with the same logit parity check.

Plain ``torch.nn.Module`` checkpoints (a directory with ``module.json``) take the
plain-PyTorch path, :mod:`modelkiln.optimize.vision` (``kiln optimize cnn``): the
variants here need an HF config to rebuild and export the model.

Example:
    >>> src = prepare_source("runs/quickstart/train", Path("/tmp/work"))
    >>> src.model_dir, src.kind
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.contract import ADAPTER_CONFIG, TRAIN_JSON, read_train_json
from modelkiln.contract.merge import MERGE_ATOL, merge_checked, merge_train_artifact
from modelkiln.errors import ConfigError


@dataclass
class Source:
    """A resolved optimize input.

    Attributes:
        model_dir: the fp32 HF model directory variants are built from.
        kind: ``hf-model``, ``train-artifact`` or ``peft-adapter``.
        given: the path the user gave.
        merge: facts of the adapter merge (method, max abs diffs, tolerance), if one happened.
    """

    model_dir: Path
    kind: str
    given: Path
    merge: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def prepare_source(path: str | Path, work_dir: Path, *, atol: float = MERGE_ATOL) -> Source:
    """Resolve ``path`` to an fp32 HF model directory, merging an adapter into ``work_dir``.

    Raises:
        ConfigError: ``path`` is none of the accepted inputs, or its adapter cannot be merged
            (prompt tuning), or it is a plain ``nn.Module`` checkpoint.
        QualityGateError: the merged model's logits differ from base + adapter by more than
            ``atol``.
    """
    given = Path(path)
    if not given.is_dir():
        raise ConfigError(
            f"optimize input {str(given)!r} is not a directory",
            hint="pass an HF model directory, a train artifact (runs/<run>/train) or a PEFT "
            "adapter directory",
        )
    if (given / TRAIN_JSON).is_file():
        return _from_train_artifact(given, work_dir, atol)
    if (given / ADAPTER_CONFIG).is_file():
        return Source(work_dir, "peft-adapter", given, merge_adapter_dir(given, work_dir, atol))
    if (given / "config.json").is_file():
        return Source(given, "hf-model", given)
    if (given / "module.json").is_file():
        raise ConfigError(
            f"{given} is a plain torch.nn.Module checkpoint; the transformer variants need an "
            "HF model directory",
            hint="optimize it with the plain-PyTorch path: kiln optimize cnn (or "
            "modelkiln.optimize.vision)",
        )
    raise ConfigError(
        f"{given} holds no model: no config.json, train.json or adapter_config.json",
        hint="pass the directory written by save_pretrained, kiln train or peft",
    )


def _from_train_artifact(root: Path, work_dir: Path, atol: float) -> Source:
    layout = read_train_json(root)
    if not layout.get("adapter"):
        model = layout.get("model", "model")
        model_dir = root / model if not Path(model).is_absolute() else Path(model)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(
                f"{root}: its model {model!r} is not a local directory",
                hint="optimize a local HF model directory",
            )
        return Source(model_dir, "train-artifact", root)
    report = merge_train_artifact(root, work_dir, atol=atol)
    return Source(work_dir, "train-artifact", root, asdict(report))


def merge_adapter_dir(adapter: Path, out: Path, atol: float = MERGE_ATOL) -> dict[str, Any]:
    """Merge a PEFT adapter into the base model it names; save the full model into ``out``.

    Base + adapter and the merged model must give the same logits (or hidden states, for
    encoders) within ``atol`` on a fixed probe batch, in memory and after reloading.

    Raises:
        ConfigError: the base cannot be found offline, or the adapter is not mergeable.
        QualityGateError: the merged outputs miss ``atol``.
    """
    import torch
    from peft import PeftConfig, PeftModel

    from modelkiln.optimize.runners import Task, auto_class

    cfg = PeftConfig.from_pretrained(str(adapter))
    if cfg.is_prompt_learning:
        raise ConfigError(
            f"{adapter}: a {cfg.peft_type} adapter cannot be merged (its virtual tokens are "
            "inputs, not weights)",
            hint="serve it as base + adapter instead of optimizing it",
        )
    base_id = cfg.base_model_name_or_path
    causal = str(cfg.task_type) in {"CAUSAL_LM", "TaskType.CAUSAL_LM"}
    task: Task = "causal-lm" if causal else "encoder"
    try:
        base = auto_class(task).from_pretrained(base_id).eval()
    except OSError as exc:
        raise ConfigError(
            f"{adapter}: its base model {base_id!r} cannot be loaded offline ({exc})",
            hint="set base_model_name_or_path in adapter_config.json to a local directory",
        ) from None
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    vocab = int(getattr(base.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    return merge_checked(
        model,
        ids,
        out,
        atol=atol,
        reload=auto_class(task),
        save_extra=lambda tmp: _copy_tokenizer([adapter, Path(base_id)], tmp),
        report={"method": str(cfg.peft_type)},
        what=f"merged {adapter}",
    )


def _copy_tokenizer(candidates: list[Path], dst: Path) -> None:
    """Save the first tokenizer found among ``candidates`` (adapter dir, then base) into dst."""
    from transformers import AutoTokenizer

    for src in candidates:
        if src.is_dir() and any(src.glob("tokenizer*")):
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(dst)
            return
