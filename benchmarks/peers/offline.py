"""Offline engines (no HTTP): the ceilings the served rates are compared with.

- Encoders: modelkiln's own backends (torch at the precision ``kiln serve`` picks here,
  and ONNX Runtime on the int8 variant) on batches of 32 real ~128-token inputs;
  forward pass timed apart from tokenization (as ``kiln optimize`` times it) and with it.
- Generation: one static batch of 32 prompts x 128 new tokens: Hugging Face ``generate``
  at modelkiln's default precision, a greedy loop over the int8 variant's KV graph in
  ONNX Runtime, and CTranslate2 int8 (in its own venv, see ``ct2_peer.py``).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .artifacts import HERE


def encoder_backend(model_dir: Path, onnx: bool) -> tuple[Any, str]:
    """modelkiln's encoder backend for ``model_dir`` and a label naming its precision."""
    if onnx:
        from modelkiln.serve.encoders import OnnxEncoderBackend

        return OnnxEncoderBackend.from_path(model_dir, threads=2), "ONNX Runtime int8"
    from modelkiln.serve.encoders import TorchEncoderBackend

    backend = TorchEncoderBackend.from_path(model_dir, "auto")
    dtype = str(next(backend.model.parameters()).dtype).replace("torch.", "")
    return backend, f"torch {dtype} (precision auto)"


def encoder_rate(
    backend: Any, texts: list[str], batch: int = 32, seconds: float = 8.0
) -> dict[str, float]:
    """Sentences/s of ``backend`` on ``texts`` in batches of ``batch``: forward only, and with
    tokenization (each text is used once; the run stops at ``seconds`` or when texts run out)."""
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    backend.encode(backend.tokenizer(batches[0])["input_ids"])  # warm-up
    tok_s = fwd_s = 0.0
    done = 0
    for chunk in batches[1:]:
        t0 = time.perf_counter()
        ids = backend.tokenizer(chunk)["input_ids"]
        t1 = time.perf_counter()
        backend.encode(ids)
        t2 = time.perf_counter()
        tok_s, fwd_s, done = tok_s + t1 - t0, fwd_s + t2 - t1, done + len(chunk)
        if tok_s + fwd_s > seconds:
            break
    return {"forward_sps": done / fwd_s, "with_tokenize_sps": done / (fwd_s + tok_s),
            "sentences": done}  # fmt: skip


def hf_static(model_dir: Path, prompts: list[str], tokens: int, dtype: str) -> float:
    """Output tokens/s of one HF ``generate`` call on all prompts as one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
          "pad_token_id": tok.pad_token_id}  # fmt: skip
    with torch.inference_mode():
        warm = {k: v[:2] for k, v in enc.items()}
        model.generate(**warm, **(kw | {"max_new_tokens": 2, "min_new_tokens": 2}))
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        seconds = time.perf_counter() - t0
    made = out.shape[1] - enc["input_ids"].shape[1]
    if made != tokens:
        raise RuntimeError(f"HF generate made {made} tokens, not {tokens}")
    return len(prompts) * tokens / seconds


def ort_static(variant_dir: Path, prompts: list[str], tokens: int) -> float:
    """Output tokens/s of a greedy static-batch loop over the variant's KV graph in ORT."""
    import numpy as np
    from transformers import AutoTokenizer

    from modelkiln.contract import KV_ONNX
    from modelkiln.kvgraph import OrtKvGenerator

    tok = AutoTokenizer.from_pretrained(str(variant_dir), padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(prompts, return_tensors="np", padding=True)
    gen = OrtKvGenerator(variant_dir / KV_ONNX, threads=2)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    gen.step(ids[:2, -4:], mask[:2, -4:], gen.empty_past(2))  # warm-up
    t0 = time.perf_counter()
    logits, past = gen.step(ids, mask, gen.empty_past(len(prompts)))
    for _ in range(tokens - 1):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = gen.step(nxt, mask, past)
    return len(prompts) * tokens / (time.perf_counter() - t0)


def ct2_static(peers: Path, ct2_dir: Path, tokenizer_dir: Path, prompts: list[str],
               tokens: int) -> dict[str, Any]:  # fmt: skip
    """CTranslate2 int8 static batch, run by ``ct2_peer.py`` in the CTranslate2 venv."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    python = peers / "ctranslate2" / "venv" / "bin" / "python"
    cmd = [str(python), str(HERE / "ct2_peer.py"), "generate", str(ct2_dir), str(tokenizer_dir),
           f.name, "--tokens", str(tokens), "--threads", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError("CTranslate2: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
