"""The handbook's entry points run for real: examples/train_code_model.py (LoRA and QLoRA) on
a tiny budget, the model and adapter it leaves load with plain transformers / peft, and
``python -m modelkiln.serve --model-path`` answers a completion from that model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import free_port, start_process

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_code_model.py"
# Seconds, not minutes: a slice of the offline corpus, a 300-token BPE, a handful of steps.
TINY = [
    "--data_set", "data.max_files=30", "--data_set", "tokenizer.vocab_size=300",
    "--set", "data.domain_modules=[]", "--set", "data.block_size=32",
    "--set", "data.max_eval_tokens=256",
    *(arg for phase in ("pretrain", "finetune")
      for key, value in (("max_steps", 3), ("eval_steps", 3), ("save_steps", 3), ("batch_size", 2))
      for arg in ("--set", f"{phase}.{key}={value}")),
]  # fmt: skip


def run_example(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The example as a user runs it, precision pinned (the test is not about precision)."""
    args = [sys.executable, str(EXAMPLE), "--quick-demo", "--output_dir", str(out), *TINY]
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*args, "--set", "precision=fp32", *extra], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def logits_of(model: Any) -> Any:
    import torch

    ids = torch.arange(5, 25).unsqueeze(0)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LoRA quick demo; its output folder."""
    out = tmp_path_factory.mktemp("demo")
    done = run_example(out)
    assert f"model:   {out / 'train' / 'model'}" in done.stdout
    assert f"adapter: {out / 'train' / 'adapter'}" in done.stdout
    return out


def test_handbook_flags_are_accepted() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--quick-demo", "--model_name", "--use_lora", "--use_qlora", "--num_epochs",
                 "--output_dir", "--r", "--alpha"):  # fmt: skip
        assert flag in out.stdout


def test_quick_demo_leaves_a_model_and_adapter_plain_libraries_load(demo: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = demo / "train" / "model", demo / "train" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert AutoTokenizer.from_pretrained(str(model_dir)).vocab_size > 0
    plain = logits_of(base)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert torch.isfinite(logits_of(adapted)).all() and plain.shape == logits_of(adapted).shape


def test_the_served_model_answers_a_completion(demo: Path) -> None:
    port = free_port()
    model = demo / "train" / "model"
    proc = start_process(["--model-path", str(model), "--precision", "fp32"], port, timeout=90)
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "model", "prompt": "def add(a, b):", "max_tokens": 4,
                  "temperature": 0},
            timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert 0 < body["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_quick_demo_with_qlora_trains_a_4bit_adapter(demo: Path) -> None:
    """Last in the file: it reuses the demo's cached data and tokenizer, replacing its train/."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run_example(demo, "--use_qlora")
    layout = json.loads((demo / "train" / "train.json").read_text())
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(
        str(demo / "train" / layout["model"]), quantization_config=quant
    )
    assert getattr(base, "is_loaded_in_4bit", False)
    model = PeftModel.from_pretrained(base, str(demo / "train" / layout["adapter"]))
    assert logits_of(model).isfinite().all()
