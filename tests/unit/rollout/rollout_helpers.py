"""Helpers of the rollout tests: tiny model folders (the registry needs no real weights)."""

from __future__ import annotations

import json
from pathlib import Path


def make_model_dir(root: Path, tag: str = "a", kind: str = "hf") -> Path:
    """A small folder that looks like an HF model, an ONNX variant or a PEFT adapter."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "tag": tag}))
        (root / "model.safetensors").write_bytes(tag.encode() * 64)
    elif kind == "onnx":
        (root / "model.onnx").write_bytes(b"onnx" + tag.encode())
        (root / "eval_card.json").write_text(json.dumps({"quality": 1.0}))
    else:
        (root / "adapter_config.json").write_text(json.dumps({"r": 4, "tag": tag}))
        (root / "adapter_model.safetensors").write_bytes(tag.encode() * 8)
    sub = root / "tokenizer"
    sub.mkdir(exist_ok=True)
    (sub / "tokenizer.json").write_text(json.dumps({"tag": tag}))
    return root
