"""LoRA adapters loaded at run time: mixed-adapter batches match peft's own output, and the
authenticated admin routes load, list and unload them (404 after unload, 401 without key)."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from http_helpers import client, code_tokenizer, config, run

from modelkiln.serve import create_app
from modelkiln.serve.generation import (
    ContinuousBatchingEngine,
    GenerationRequest,
    SamplingParams,
    TorchCausalLMBackend,
)

peft = pytest.importorskip("peft")
EOS, PAD = 0, 1
PROMPTS = [[5, 17, 42, 9], [33, 8], [101, 102, 103, 104, 105, 7]]
ADMIN = {"Authorization": "Bearer admin-key"}


def base_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(code_tokenizer()), max_position_embeddings=128,
        eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@lru_cache(maxsize=1)
def adapters() -> dict[str, Path]:
    """Two LoRA adapters with random (non-zero) B matrices, saved by peft."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    root = Path(tempfile.mkdtemp(prefix="kiln-lora-"))
    out = {}
    for i, name in enumerate(["alpha", "beta"]):
        model = base_model()
        torch.manual_seed(100 + i)  # after base_model(), which seeds 0
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # fmt: skip
        get_peft_model(model, lora).save_pretrained(str(root / name))
        out[name] = root / name
    return out


def reference(adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy ids from HF generate on the base model, or on peft's own PeftModel."""
    from peft import PeftModel

    model = base_model()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapters()[adapter])).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS,
                             pad_token_id=PAD)  # fmt: skip
    return [t for t in out[0, len(prompt) :].tolist() if t != EOS]


def engine() -> ContinuousBatchingEngine:
    return ContinuousBatchingEngine(TorchCausalLMBackend(base_model()), code_tokenizer(),
                                 model_name="lm", max_num_seqs=8)  # fmt: skip


def greedy(rid: str, prompt: list[int], adapter: str | None, n: int = 10) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(n, temperature=0.0), adapter=adapter)


def test_a_batch_mixing_adapters_matches_peft_and_differs_from_base() -> None:
    eng = engine()
    plan = [(p, a) for p in PROMPTS for a in (None, "alpha", "beta")]

    async def main() -> list[list[int]]:
        await eng.start()
        for name, path in adapters().items():
            await eng.load_adapter(name, path)
        assert sorted(eng.adapters) == ["alpha", "beta"]

        async def one(i: int, prompt: list[int], adapter: str | None) -> list[int]:
            stream = eng.generate(greedy(f"r{i}", prompt, adapter))
            return [e.token_id async for e in stream if e.token_id not in (None, EOS)]

        # All nine join the same batch: base rows and both adapters in one forward pass.
        outs = await asyncio.gather(*(one(i, p, a) for i, (p, a) in enumerate(plan)))
        await eng.shutdown(5)
        return list(outs)

    outs = run(main())
    for (prompt, adapter), got in zip(plan, outs, strict=True):
        assert got == reference(adapter, prompt, 10), (prompt, adapter)
    for i in range(len(PROMPTS)):
        base, alpha, beta = outs[3 * i : 3 * i + 3]
        assert alpha != base and beta != base and alpha != beta


def test_unloading_the_last_adapter_restores_the_plain_model_and_refuses_it() -> None:
    eng = engine()

    async def main() -> tuple[list[int | None], list[int | None]]:
        await eng.start()
        await eng.load_adapter("alpha", adapters()["alpha"])
        with_adapter = [e.token_id async for e in eng.generate(greedy("a", PROMPTS[0], "alpha"))]
        assert await eng.unload_adapter("alpha") == 0
        assert eng.adapters == {} and eng.backend._peft is None
        with pytest.raises(Exception, match="no adapter named 'alpha'"):
            eng.generate(greedy("b", PROMPTS[0], "alpha"))
        base = [e.token_id async for e in eng.generate(greedy("c", PROMPTS[0], None))]
        await eng.shutdown(5)
        return with_adapter, base

    with_adapter, base = run(main())
    assert [t for t in base if t not in (None, EOS)] == reference(None, PROMPTS[0], 10)
    assert with_adapter != base


def _app(**cfg: Any) -> Any:
    return create_app(config(**cfg), engines={"lm": engine()})


def test_admin_routes_load_select_and_unload_an_adapter_over_http() -> None:
    path = str(adapters()["alpha"])
    body = {"model": "lm:alpha", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}

    async def main() -> dict[str, httpx.Response]:
        app = _app(api_keys=["user-key"], admin_keys=["admin-key"])
        user = {"Authorization": "Bearer user-key"}
        r: dict[str, httpx.Response] = {}
        async with client(app) as c:
            load = {"name": "alpha", "path": path}
            r["no_key"] = await c.post("/admin/adapters", json=load)
            r["user_key"] = await c.post("/admin/adapters", json=load, headers=user)
            r["before"] = await c.post("/v1/completions", json=body, headers=user)
            r["load"] = await c.post("/admin/adapters", json=load, headers=ADMIN)
            r["again"] = await c.post("/admin/adapters", json=load, headers=ADMIN)
            r["bad_path"] = await c.post(
                "/admin/adapters", json={"name": "x", "path": "/nonexistent"}, headers=ADMIN
            )
            r["list"] = await c.get("/admin/adapters", headers=ADMIN)
            r["models"] = await c.get("/v1/models", headers=user)
            r["adapter"] = await c.post("/v1/completions", json=body, headers=user)
            r["base"] = await c.post("/v1/completions", json=body | {"model": "lm"}, headers=user)
            r["unknown"] = await c.post(
                "/v1/completions", json=body | {"model": "lm:nope"}, headers=user
            )
            r["delete"] = await c.delete("/admin/adapters/alpha", headers=ADMIN)
            r["after"] = await c.post("/v1/completions", json=body, headers=user)
            r["delete_again"] = await c.delete("/admin/adapters/lm:alpha", headers=ADMIN)
        return r

    r = run(main())
    assert r["no_key"].status_code == 401 and r["user_key"].status_code == 401
    assert r["no_key"].json()["error"]["type"] == "authentication_error"
    assert r["before"].status_code == 404
    assert r["load"].status_code == 201, r["load"].text
    assert r["load"].json()["id"] == "lm:alpha"
    assert r["again"].status_code == 409 and r["bad_path"].status_code == 400
    assert [a["id"] for a in r["list"].json()["data"]] == ["lm:alpha"]
    assert [m["id"] for m in r["models"].json()["data"]] == ["lm", "lm:alpha"]
    assert r["adapter"].status_code == 200, r["adapter"].text
    assert r["adapter"].json()["model"] == "lm:alpha"
    tok = code_tokenizer()
    expected = tok.decode(reference("alpha", PROMPTS[0], 10))
    assert r["adapter"].json()["choices"][0]["text"] == expected
    assert r["base"].json()["choices"][0]["text"] != expected
    for key in ("unknown", "after"):
        assert r[key].status_code == 404, r[key].text
        assert r[key].json()["error"]["code"] == "model_not_found"
    assert r["delete"].status_code == 200 and r["delete"].json()["cancelled_requests"] == 0
    assert r["delete_again"].status_code == 404


def test_admin_routes_are_off_without_an_admin_key() -> None:
    async def main() -> httpx.Response:
        async with client(_app()) as c:
            return await c.get("/admin/adapters", headers=ADMIN)

    r = run(main())
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_command_line_sets_admin_keys_and_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkiln.serve.__main__ import build_parser, config_from_args

    monkeypatch.setenv("MODELKILN_ADMIN_KEYS", "from-env")
    args = build_parser().parse_args(
        ["--model-path", "m", "--admin-key", "a1", "--api-key", "u1", "--compile"]
    )
    cfg = config_from_args(args)
    assert cfg.resolved_admin_keys() == ["a1", "from-env"]
    assert [k.get_secret_value() for k in cfg.api_keys] == ["u1"]
    assert cfg.models[0].compile is True
