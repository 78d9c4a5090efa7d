"""Encrypted ONNX variants served by a real server with ``--decrypt-key-file``: an encoder
(``model.onnx`` + external data) and a causal LM (``model_kv.onnx`` + external data) answer
exactly as their plaintext copies served beside them; no plaintext reaches the disk (the
server's temp dir stays empty, the variant directory unchanged); the wrong key and a tampered
external-data file fail the start with one clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_support import ROOT, free_port, save_tiny_gpt2, stop_process, wait_ready

from http_helpers import TEXTS, tiny_encoder_dir  # isort: skip (serve_support puts it on the path)

from modelkiln.errors import ServingError
from modelkiln.security.encryption import encrypt_path, generate_key_file

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings


def _external(graph: Path) -> None:
    """Move every initializer of ``graph`` to ``<graph>.data`` (as large exports are)."""
    model = onnx.load(str(graph))
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=graph.name + ".data", size_threshold=0)  # fmt: skip
    assert (graph.parent / (graph.name + ".data")).stat().st_size > 10_000


def _encoder_variant(out: Path) -> Path:
    import torch
    from transformers import AutoModel

    src = tiny_encoder_dir()
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    model = AutoModel.from_pretrained(str(src)).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        LastHidden(), (ids, torch.ones_like(ids)), str(out / "model.onnx"),
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        dynamo=False,
    )  # fmt: skip
    _external(out / "model.onnx")
    return out


def _lm_variant(tmp_path: Path) -> Path:
    from modelkiln.kvgraph import KV_ONNX, export_kv_graph

    hf = save_tiny_gpt2(tmp_path / "hf")
    out = tmp_path / "lm-onnx"
    out.mkdir()
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    export_kv_graph(hf, out / KV_ONNX)
    _external(out / KV_ONNX)
    return out


def _encrypted_copy(variant: Path, key: Path) -> Path:
    enc = variant.with_name(variant.name + "-enc")
    shutil.copytree(variant, enc)
    encrypt_path(enc, key, remove_plaintext=True)
    assert not list(enc.glob("*.onnx")) and not list(enc.glob("*.data"))
    return enc


def _plaintext_written(plain: Path, *dirs: Path) -> list[str]:
    """Files under ``dirs`` holding a 64-byte slice of a plaintext graph or weight file."""
    samples = []
    for f in plain.iterdir():
        if f.name.endswith((".onnx", ".data")):
            blob = f.read_bytes()
            samples.append(blob[len(blob) // 2 : len(blob) // 2 + 64])
    found = []
    for d in dirs:
        for f in (p for p in d.rglob("*") if p.is_file()):
            blob = f.read_bytes()
            found += [str(f) for s in samples if s in blob]
    return found


def _start(args: list[str], port: int, tmp: Path) -> subprocess.Popen[str]:
    env = os.environ | {"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        [sys.executable, "-m", "modelkiln.serve", *args, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


def test_kiln_serve_decrypts_an_onnx_encoder_in_memory(tmp_path: Path) -> None:
    plain = _encoder_variant(tmp_path / "enc-onnx")
    keys = tmp_path / "keys"
    keys.mkdir()
    key = generate_key_file(keys / "model.key")
    enc = _encrypted_copy(plain, key)
    files = {p.name: p.stat().st_mtime_ns for p in enc.iterdir()}
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    port = free_port()
    args = ["--model-path", str(plain), "--name", "plain", "--model-path", str(enc),
            "--name", "enc", "--decrypt-key-file", str(key)]  # fmt: skip
    proc = _start(args, port, server_tmp)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120, proc)
        got = {
            name: httpx.post(
                f"http://127.0.0.1:{port}/v1/embeddings",
                timeout=30,
                json={"model": name, "input": TEXTS[:3]},
            )
            for name in ("plain", "enc")
        }
    finally:
        stop_process(proc)
    for r in got.values():
        assert r.status_code == 200, r.text
    vectors = {n: np.array([d["embedding"] for d in r.json()["data"]]) for n, r in got.items()}
    np.testing.assert_allclose(vectors["enc"], vectors["plain"], atol=1e-6)
    assert _plaintext_written(plain, server_tmp, enc) == []  # nothing decrypted to disk
    assert not [p for p in server_tmp.rglob("*") if p.suffix in (".onnx", ".data")]
    assert {p.name: p.stat().st_mtime_ns for p in enc.iterdir()} == files

    wrong = generate_key_file(keys / "wrong.key")
    proc = _start(["--model-path", str(enc), "--decrypt-key-file", str(wrong)], port, server_tmp)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "cannot decrypt model.onnx: wrong key, or the file was changed" in out, out
    assert "Traceback" not in out, out


def _complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": [5, 17, 42], "max_tokens": 6, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_encrypted_onnx_causal_lm_serves_and_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from modelkiln.security.serving import SecurityPolicy
    from modelkiln.serve import ModelServer, ServeConfig

    plain = _lm_variant(tmp_path)
    key = generate_key_file(tmp_path / "model.key")
    enc = _encrypted_copy(plain, key)
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(server_tmp))

    def config(*paths: Path) -> ServeConfig:
        models = [{"path": str(p), "name": p.name} for p in paths]
        return ServeConfig.model_validate({"models": models, "port": 0, "drain_timeout_s": 2})

    server = ModelServer(
        config=config(plain, enc), hooks=SecurityPolicy(decrypt_key_file=key).hooks()
    )
    url = server.start(timeout=120)
    try:
        texts = {p.name: _complete(url, p.name) for p in (plain, enc)}
        kinds = httpx.get(url + "/v1/models", timeout=10).json()
    finally:
        server.stop()
    assert texts[enc.name] == texts[plain.name] and len(texts[enc.name]) > 0
    assert enc.name in {m["id"] for m in kinds["data"]}
    assert _plaintext_written(plain, server_tmp, enc) == []  # nothing decrypted to disk
    assert not [p for p in server_tmp.rglob("*") if p.suffix in (".onnx", ".data")]

    wrong = SecurityPolicy(decrypt_key_file=generate_key_file(tmp_path / "wrong.key"))
    with pytest.raises(ServingError, match="cannot decrypt model_kv.onnx: wrong key"):
        ModelServer(config=config(enc), hooks=wrong.hooks()).start(timeout=120)
    data = enc / "model_kv.onnx.data.enc"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(ServingError, match="cannot decrypt model_kv.onnx.data: wrong key, or the"):
        ModelServer(config=config(enc), hooks=SecurityPolicy(decrypt_key_file=key).hooks()).start(
            timeout=120
        )
