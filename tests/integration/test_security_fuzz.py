"""Schemathesis fuzzes every operation of the server's OpenAPI schema — a tiny BERT encoder
and a tiny GPT-2 served, the security plug-in on — with valid and invalid inputs: no
answer may be a 5xx. Bounded: a few examples per operation and mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from serve_support import save_tiny_gpt2

from modelkiln.security.keys import KeyStore
from modelkiln.security.serving import SecurityPolicy
from modelkiln.serve import ModelServer, ServeConfig

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = 6  # per operation and generation mode: ~150 requests in all


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from http_helpers import tiny_encoder_dir  # on sys.path once serve_support is imported

    tmp = tmp_path_factory.mktemp("fuzz")
    lm = save_tiny_gpt2(tmp / "lm")
    store = KeyStore(tmp / "keys.json")
    key, _ = store.create("admin")
    cfg = ServeConfig.model_validate(
        {
            "models": [
                {"path": str(tiny_encoder_dir()), "name": "enc", "precision": "fp32"},
                {"path": str(lm), "name": "lm", "precision": "fp32"},
            ],
            "port": 0,
            "drain_timeout_s": 2,
            "max_input_tokens": 64,
        }
    )
    srv = ModelServer(config=cfg, hooks=SecurityPolicy(keys=store).hooks())
    url = srv.start(timeout=120)
    try:
        yield url, key
    finally:
        srv.stop()


def _fuzz(
    operation: Any, url: str, headers: dict[str, str], mode: Any, calls: list[int]
) -> list[str]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=60)
        calls.append(response.status_code)
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.path} {case.body!r} -> "
                f"{response.status_code} {response.text[:200]}"
            )

    with contextlib.suppress(Unsatisfiable):  # no invalid input exists (no parameters)
        one()
    return failures


def test_no_route_answers_5xx(server: tuple[str, str]) -> None:
    from schemathesis import GenerationMode

    url, key = server
    schema = schemathesis.openapi.from_url(
        url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/admin/adapters"} <= paths
    failures: list[str] = []
    calls: list[int] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += _fuzz(op, url, {"Authorization": f"Bearer {key}"}, mode, calls)
    assert not failures, "\n".join(failures[:10])
    assert len(calls) >= 5 * len(operations)  # the fuzzer really sent requests ...
    assert {200, 400} <= set(calls)  # ... valid ones and invalid ones
