"""/v1/embeddings over ASGI with a tiny random BERT: formats, dimensions, limits, batching."""

from __future__ import annotations

import asyncio
import base64
import functools
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from http_helpers import client, config, encoder_spec, metric, run, tiny_encoder_dir

from modelkiln.hardware import TOLERANCE
from modelkiln.serve import create_app
from modelkiln.serve.encoders import TorchEncoderBackend

TEXTS = ["def add x y", "class a pass", "hello world hello world hello"]


def post_all(bodies: list[dict[str, Any]], **cfg: Any) -> tuple[list[httpx.Response], str]:
    async def go() -> tuple[list[httpx.Response], str]:
        app = create_app(config(**({"models": [encoder_spec()]} | cfg)))
        async with client(app) as c:
            out = [await c.post("/v1/embeddings", json=b) for b in bodies]
            return out, (await c.get("/metrics")).text

    return run(go())


def post(body: dict[str, Any], **cfg: Any) -> httpx.Response:
    return post_all([body], **cfg)[0][0]


PRECISIONS = ["fp32", "bf16"]  # both kernel paths run on every CPU class


@pytest.fixture(scope="module", params=PRECISIONS)
def precision(request: pytest.FixtureRequest) -> str:
    """The served precision, pinned (``auto`` is the subject of its own test)."""
    return str(request.param)


@functools.cache
def vectors(precision: str) -> np.ndarray:
    """The model's vectors at ``precision``, one text at a time (no padding)."""
    backend = TorchEncoderBackend.from_path(tiny_encoder_dir(), precision=precision)  # type: ignore[arg-type]
    ids = backend.tokenizer(TEXTS)["input_ids"]
    return np.stack([backend.encode([seq])[0] for seq in ids])


@pytest.fixture
def reference(precision: str) -> np.ndarray:
    """The reference at the served precision."""
    return vectors(precision)


def enc(precision: str) -> dict[str, Any]:
    """The tiny encoder spec served at ``precision``."""
    return {"models": [encoder_spec() | {"precision": precision}]}


def test_float_embeddings_match_the_model_in_order(reference: np.ndarray, precision: str) -> None:
    r = post({"model": "enc", "input": TEXTS}, **enc(precision))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "enc"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    got = np.array([d["embedding"] for d in body["data"]])
    # Batched (padded) == one by one, at the same precision: the tolerance is that precision's.
    np.testing.assert_allclose(got, reference, atol=TOLERANCE[precision])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_base64_and_dimensions(reference: np.ndarray, precision: str) -> None:
    body = {"model": "enc", "input": TEXTS[0], "encoding_format": "base64", "dimensions": 8}
    r = post(body, **enc(precision))
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    expected = reference[0, :8] / np.linalg.norm(reference[0, :8])
    np.testing.assert_allclose(vec, expected, atol=TOLERANCE[precision])
    r = post({"model": "enc", "input": "x", "dimensions": 33}, **enc(precision))
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


@pytest.mark.parametrize(("cpu", "dtype"), [("avx2", "float32"), ("avx512_bf16", "bfloat16"),
                                            ("amx", "bfloat16")])  # fmt: skip
def test_auto_precision_follows_the_cpu_class(cpu: str, dtype: str, fake_cpu_class: Any) -> None:
    fake_cpu_class(cpu)
    backend = TorchEncoderBackend.from_path(tiny_encoder_dir(), precision="auto", device="cpu")
    assert str(backend.model.dtype) == f"torch.{dtype}"


def test_token_id_inputs_and_input_limits() -> None:
    assert post({"model": "enc", "input": [2, 7, 3]}).status_code == 200
    assert post({"model": "enc", "input": [[2, 7, 3], [2, 3]]}).status_code == 200
    bad = [
        ({"model": "enc", "input": [2, 10_000]}, "outside the vocabulary"),
        ({"model": "enc", "input": []}, "empty"),
        ({"model": "enc", "input": ["hello " * 100]}, "the limit of 'enc' is 64"),
        ({"model": "enc", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "enc", "input": [[]]}, "input 0 is empty"),
    ]
    responses, _ = post_all([b for b, _ in bad])
    for r, (_, words) in zip(responses, bad, strict=True):
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]["message"]


def test_concurrent_requests_share_batches_and_repeats_hit_the_cache() -> None:
    async def go() -> str:
        app = create_app(config(models=[encoder_spec()], embedding={"max_wait_ms": 20}))
        async with client(app) as c:
            bodies = [{"model": "enc", "input": f"hello {i} world"} for i in range(12)]
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in rs)
            again = await c.post("/v1/embeddings", json=bodies[0])
            assert again.json() == rs[0].json()
            return (await c.get("/metrics")).text

    text = run(go())
    assert metric(text, "ml_batch_size_count", model_name="enc") < 12
    assert metric(text, "ml_batch_size_sum", model_name="enc") == 12
    assert metric(text, "ml_cache_hits_total", model_name="enc") == 1
    assert metric(text, "ml_queue_time_seconds_count", model_name="enc") == 12
    assert metric(text, "ml_requests_total", model_name="enc", status="200") == 13


def test_one_process_serves_an_encoder_and_a_causal_lm() -> None:
    from http_helpers import FakeEngine

    async def go() -> list[httpx.Response]:
        cfg = config(models=[encoder_spec(), {"path": "fake", "name": "lm"}])
        app = create_app(cfg, engines={"lm": FakeEngine()})
        async with client(app) as c:
            return [
                await c.get("/v1/models"),
                await c.post("/v1/embeddings", json={"model": "lm", "input": "x"}),
                await c.post("/v1/completions", json={"model": "enc", "prompt": "x"}),
                await c.post("/v1/completions", json={"model": "lm", "prompt": "x"}),
            ]

    models, wrong_enc, wrong_lm, ok = run(go())
    assert sorted(m["id"] for m in models.json()["data"]) == ["enc", "lm"]
    assert wrong_enc.status_code == wrong_lm.status_code == 400
    assert "use /v1/completions" in wrong_enc.json()["error"]["message"]
    assert "use /v1/embeddings" in wrong_lm.json()["error"]["message"]
    assert ok.status_code == 200


def _export_onnx(out: Path) -> Path:
    import torch
    from transformers import AutoModel

    src = tiny_encoder_dir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    model = AutoModel.from_pretrained(str(src)).eval()

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        LastHidden(), (ids, torch.ones_like(ids)), str(out / "model.onnx"),
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        dynamo=False,
    )  # fmt: skip
    return out


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's tracer warnings
def test_onnx_backend_serves_the_same_vectors(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    onnx_dir = _export_onnx(tmp_path)
    spec = {"path": str(onnx_dir), "name": "enc"}  # backend auto: .onnx and no torch weights
    r = post_all([{"model": "enc", "input": TEXTS}], models=[spec])[0][0]
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(got, vectors("fp32"), atol=1e-4)  # the ONNX export is fp32


def test_slow_batches_give_504_past_the_deadline() -> None:
    import time as _time

    from modelkiln.serve.embeddings import EmbeddingEngine

    backend = TorchEncoderBackend.from_path(tiny_encoder_dir(), precision="fp32")
    slow_encode = backend.encode

    def encode(batch: list[list[int]]) -> np.ndarray:
        _time.sleep(0.4)
        return slow_encode(batch)

    backend.encode = encode  # type: ignore[method-assign]

    async def go() -> httpx.Response:
        cfg = config(models=[encoder_spec()], request_timeout_s=0.1)
        app = create_app(cfg, engines={"enc": EmbeddingEngine(backend, model_name="enc")})
        async with client(app) as c:
            return await c.post("/v1/embeddings", json={"model": "enc", "input": "hello"})

    r = run(go())
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


@pytest.mark.parametrize("calibrated", [True, False])
def test_a_fresh_server_admits_64_at_once_as_its_start_measured_a_rate(
    calibrated: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server times a full batch at start; without it, a fresh server queues only 32."""
    from modelkiln.serve.embeddings import EmbeddingEngine

    if not calibrated:  # the control: what a fresh server did before
        monkeypatch.delattr(EmbeddingEngine, "calibrate")

    async def go() -> list[int]:
        app = create_app(config(models=[encoder_spec()], cache={"enabled": False}))
        async with client(app) as c:
            bodies = [{"model": "enc", "input": f"def f{i}(x): return x + {i}"} for i in range(64)]
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))
            return [r.status_code for r in rs]

    statuses = run(go())
    if calibrated:
        assert statuses == [200] * 64
    else:
        assert statuses.count(429) >= 1 and set(statuses) == {200, 429}
