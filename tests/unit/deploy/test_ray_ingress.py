"""The Ray ingress's forwarding: a replica that dies before answering -> retry, then 503.

The handle is a stand-in for Serve's ``DeploymentHandle`` (the real one is exercised in
tests/integration/test_deploy_ray.py, where a replica is killed under load).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError

from modelkiln.deploy.ray_ingress import Forwarder

OK = [{"type": "http.response.start", "status": 200, "headers": []},
      {"type": "http.response.body", "body": b"{}"}]  # fmt: skip


class _Handle:
    """``options(stream=True).forward.remote(scope, body)``; each call plays the next script:
    ``"die"``: the replica dies before answering; ``"cut"``: it dies after the status line;
    ``"mid"``: it dies after the status line and a first part of a streamed body."""

    def __init__(self, scripts: list[str]) -> None:
        self.scripts, self.calls = scripts, []  # type: list[str], list[tuple[dict, bytes]]
        self.forward = self

    def options(self, **kwargs: Any) -> _Handle:
        assert kwargs == {"stream": True}
        return self

    async def _stream(self, script: str) -> AsyncIterator[dict[str, Any]]:
        if script in {"cut", "mid"}:
            yield OK[0]
        if script == "mid":
            yield {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
        if script in {"die", "cut", "mid"}:
            raise ActorDiedError()
        for message in OK:
            yield message

    def remote(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        self.calls.append((scope, body))
        return self._stream(self.scripts[len(self.calls) - 1])


def _request(forwarder: Forwarder) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": b'{"a":', "more_body": True},
              {"type": "http.request", "body": b"1}"}]  # fmt: skip

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
             "query_string": b"", "app": object()}  # fmt: skip
    asyncio.run(forwarder(scope, receive, send))
    return sent


def test_request_on_a_dead_replica_is_sent_again_with_its_body() -> None:
    handle = _Handle(["die", "ok"])
    sent = _request(Forwarder(handle, retries=1))
    assert sent[0]["headers"] == [(b"x-kiln-retries", b"1")] and sent[1:] == OK[1:]
    assert [body for _, body in handle.calls] == [b'{"a":1}', b'{"a":1}']
    assert "app" not in handle.calls[0][0]  # only the picklable parts of the scope travel


def test_replicas_dying_past_the_retries_give_503_with_retry_after() -> None:
    handle = _Handle(["die", "die"])
    sent = _request(Forwarder(handle, retries=1))
    assert len(handle.calls) == 2
    assert sent[0]["status"] == 503
    assert dict(sent[0]["headers"])[b"retry-after"] == b"1"
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "replica_unavailable" and "ActorDiedError" in error["message"]


def test_a_replica_dying_between_status_line_and_body_is_resent() -> None:
    # The status line is held until the first body part: the client has nothing yet.
    handle = _Handle(["cut", "ok"])
    sent = _request(Forwarder(handle, retries=1))
    assert len(handle.calls) == 2
    assert sent[0]["status"] == 200 and sent[0]["headers"] == [(b"x-kiln-retries", b"1")]
    assert sent[1:] == OK[1:]


def test_a_stream_cut_after_its_first_body_part_is_not_resent() -> None:
    handle = _Handle(["mid", "ok"])
    with pytest.raises(ActorDiedError):
        _request(Forwarder(handle, retries=1))
    assert len(handle.calls) == 1  # the client already has part of the body: close, no resend
