"""Training: pretraining, full fine-tuning and PEFT (LoRA, QLoRA, AdaLoRA, prompt tuning, IA3).

Exports are lazy: importing this package imports neither torch nor transformers.

Example:
    >>> from modelkiln.train import TrainConfig, train
    >>> art = train(TrainConfig(), data="runs/q/data", tokenizer="runs/q/tokenizer",
    ...             run_dir="runs/q")
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "modelkiln.train.config",
    "train": "modelkiln.train.api",
    "merge": "modelkiln.train.api",
    "load_trained": "modelkiln.train.api",
    "MergeReport": "modelkiln.train.api",
    "CodeModelTrainer": "modelkiln.train.api",
    "DistributedTrainer": "modelkiln.train.api",
    "LaunchSpec": "modelkiln.train.launch",
    "launch_train": "modelkiln.train.launch",
    "run_train_stage": "modelkiln.train.stage",
    "METHODS": "modelkiln.train.peft_methods",
    "get_method": "modelkiln.train.peft_methods",
    "ContrastiveConfig": "modelkiln.train.encoder",
    "train_contrastive": "modelkiln.train.encoder",
    "EncoderJobConfig": "modelkiln.train.encoder_job",
    "train_encoder": "modelkiln.train.encoder_job",
    "MonitorConfig": "modelkiln.train.config",
    "TrainingMonitor": "modelkiln.train.monitor",
    "MonitoredTrainer": "modelkiln.train.monitor",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modelkiln.train' has no attribute {name!r}")
