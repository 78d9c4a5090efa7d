"""LoRA adapters as canary units on a real server: three adapter versions of one tiny GPT-2
run as *runtime* adapters on one shared base model behind the rollout gateway (the gateway
rewrites ``model`` to ``<base>:v<N>``); a canary of v2 promotes, a faulty v3 rolls back; a
v4 registered later is added to the running gateway through the admin API and rolls out."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, wait_ready
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.rollout.faults import FaultInjector, FaultSpec
from modelkiln.rollout.registry import Registry
from modelkiln.rollout.serving import build_gateway, registry_versions

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer adm"}
FAST = {"steps": [50, 100], "dwell_s": 3, "check_interval_s": 1, "min_requests": 5}
BODY = {"model": "tiny", "prompt": "def add(", "max_tokens": 4, "temperature": 0}


def save_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of ``base`` with random (non-zero) weights, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base)  # records base as base_model_name_or_path
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Registry, Any, Path]]:
    import uvicorn

    pytest.importorskip("peft")
    tmp = tmp_path_factory.mktemp("lora")
    base = save_tiny_gpt2(tmp / "base")
    reg = Registry(tmp / "reg")
    for i in range(3):
        reg.add("tiny", save_adapter(base, tmp / f"adapter{i}", seed=10 + i))
    reg.promote("tiny", 1, "production")
    folders, serving = registry_versions(reg, "tiny", ["1", "2", "3"])
    gw = build_gateway(
        "tiny", folders, serving=serving, state_dir=tmp / "state", admin_keys=["adm"],
        registry=reg, model_options={"backend": "torch", "precision": "fp32"},
        serve_config={"cache": {"enabled": False}, "max_queue_wait_s": 60},
        faults={"3": FaultInjector(FaultSpec(error_rate=0.5), seed=0)}, tick_s=0.2,
    )  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 120)  # 503 until the adapters are loaded
    yield url, reg, gw, tmp
    server.should_exit = True
    thread.join(30)


def _run_rollout(url: str, candidate: str) -> tuple[dict[str, Any], dict[str, int]]:
    r = httpx.post(url + "/admin/rollout/tiny/start", headers=ADMIN, timeout=10,
                   json={"candidate": candidate, "canary": FAST})  # fmt: skip
    assert r.status_code == 200, r.text
    seen: dict[str, int] = {}
    end = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            for _ in range(5):
                r = client.post("/v1/completions", json=BODY)
                key = f"{r.headers.get('x-model-version')}:{r.status_code}"
                seen[key] = seen.get(key, 0) + 1
            view = client.get("/admin/rollout/tiny", headers=ADMIN).json()
            if view["rollout"]["status"] != "running":
                return view, seen
    raise AssertionError(f"rollout of v{candidate} still running after 120 s")


def test_adapter_versions_share_one_base_model(
    lora_gateway: tuple[str, Registry, Any, Path],
) -> None:
    url, _, gw, _ = lora_gateway
    assert gw.adapters.loaded == ["tiny.base:v1", "tiny.base:v2", "tiny.base:v3"]
    ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert "tiny.base" in ids and not any(i.startswith("tiny.v") for i in ids)  # no merged copy
    assert {"tiny.base:v1", "tiny.base:v2", "tiny.base:v3"} <= set(ids)
    r = httpx.post(url + "/v1/completions", json=BODY, timeout=30)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    assert r.json()["model"] == "tiny.base:v1"  # the gateway rewrote the name to the adapter


def test_adapter_canary_promotes_then_faulty_adapter_rolls_back(
    lora_gateway: tuple[str, Registry, Any, Path],
) -> None:
    url, reg, _, _ = lora_gateway
    view, seen = _run_rollout(url, "2")
    assert view["rollout"]["status"] == "promoted", view["decisions"][-3:]
    assert view["policy"]["weights"] == {"2": 100} and seen.get("2:200", 0) > 0
    assert reg.show("tiny", "production").version == 2
    view, _ = _run_rollout(url, "3")
    assert view["rollout"]["status"] == "rolled-back", view["decisions"][-3:]
    assert view["policy"]["weights"] == {"2": 100}
    last = view["decisions"][-1]
    assert last["action"] == "rollback" and "errors" in last["reason"]
    answer = httpx.post(url + "/v1/completions", json=BODY, timeout=30).json()
    assert answer["model"] == "tiny.base:v2", json.dumps(answer)[:200]


def test_add_an_adapter_version_to_the_running_gateway(
    lora_gateway: tuple[str, Registry, Any, Path],
) -> None:
    url, reg, gw, tmp = lora_gateway
    baseline = str(reg.show("tiny", "production").version)
    v4 = reg.add("tiny", save_adapter(tmp / "base", tmp / "adapter4", seed=20)).version
    full = reg.add("tiny", tmp / "base").version  # a full model: cannot be added live

    def add(version: int, key: dict[str, str] = ADMIN) -> httpx.Response:
        return httpx.post(url + "/admin/rollout/tiny/versions", json={"version": str(version)},
                          headers=key, timeout=60)  # fmt: skip

    assert add(v4, {"Authorization": "Bearer nope"}).status_code == 401
    bad = add(full)
    assert bad.status_code == 400 and "not a PEFT adapter" in bad.text
    assert add(99).status_code == 400  # no such registry version
    cli = CliRunner().invoke(
        app, ["rollout", "add-version", f"tiny@{v4}", "--url", url, "--admin-key", "adm"]
    )
    assert cli.exit_code == 0, cli.output
    assert str(v4) in gw.versions["tiny"] and f"tiny.base:v{v4}" in gw.adapters.loaded
    assert add(v4).status_code == 409  # already loaded
    view, seen = _run_rollout(url, str(v4))
    assert view["rollout"]["status"] == "promoted", view["decisions"][-3:]
    assert seen.get(f"{v4}:200", 0) > 0 and baseline != str(v4)
    answer = httpx.post(url + "/v1/completions", json=BODY, timeout=30).json()
    assert answer["model"] == f"tiny.base:v{v4}"
