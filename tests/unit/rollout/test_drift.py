"""Drift in the gates: ``GET /v1/monitor`` read over real HTTP (a loopback server serving
the monitor's JSON), the controller under a fake clock holding or rolling back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_controller import Harness, spec

from modelkiln.rollout.drift import HttpDriftProbe, drifted_features
from modelkiln.rollout.gateway import served_name
from modelkiln.rollout.policy import CanaryConfig

SHORT = CanaryConfig(steps=[50, 100], dwell_s=30, check_interval_s=10, min_requests=10)


def entry(version: str, drifted: bool, checked: bool = True, profile: str = "ok") -> dict[str, Any]:
    """One ``models[]`` entry of ``/v1/monitor`` (the monitor helper's documented schema)."""
    feature = {"model": f"m.v{version}", "version": version, "feature": "input_tokens",
               "group": "request", "test": "ks", "drifted": drifted}  # fmt: skip
    return {"model": f"m.v{version}", "version": version, "profile": {"status": profile},
            "drift_checked": checked, "drift_detected": drifted, "features": [feature]}  # fmt: skip


@pytest.fixture
def monitor() -> Iterator[tuple[str, dict[str, Any]]]:
    """A loopback HTTP server answering ``GET /v1/monitor`` with a mutable snapshot."""
    snap: dict[str, Any] = {"time": 0, "checks": 1, "models": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(snap).encode() if self.path == "/v1/monitor" else b"{}"
            self.send_response(200 if self.path == "/v1/monitor" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", snap
    server.shutdown()


def test_drifted_features_reads_the_documented_schema() -> None:
    snap = {"models": [entry("1", False), entry("2", True)]}
    assert drifted_features(snap, "m.v2", "2") == ["input_tokens (ks)"]
    assert drifted_features(snap, "m.v1", "1") == []
    assert drifted_features(snap, "m.v3", "3") is None  # not seen
    assert drifted_features({"models": [entry("2", True, checked=False)]}, "m.v2", "2") is None
    assert drifted_features({"models": [entry("2", True, profile="missing")]}, "m.v2", "2") is None


def test_candidate_drift_holds_over_http(tmp_path: Path, monitor: Any) -> None:
    url, snap = monitor
    snap["models"] = [entry("1", False), entry("2", True)]
    h = Harness(tmp_path, drift=HttpDriftProbe(url, served_name))
    h.ctl.start(spec(canary=SHORT))
    h.run(80)
    assert h.policies["m"].weights == {"1": 50, "2": 50}  # held past its dwell time
    last = h.store.decisions("m")[-1]
    assert last.action == "hold"
    assert "drift on the candidate 2 (input_tokens (ks)); baseline 1: no drift" in last.reason
    snap["models"] = [entry("1", False), entry("2", False)]  # the drift is gone: it ramps on
    h.run(60)
    assert h.policies["m"].weights == {"2": 100}


def test_candidate_drift_rolls_back_when_configured(tmp_path: Path, monitor: Any) -> None:
    url, snap = monitor
    snap["models"] = [entry("1", False), entry("2", True)]
    h = Harness(tmp_path, drift=HttpDriftProbe(url, served_name))
    h.ctl.start(spec(analysis={"drift_action": "rollback"}))
    h.run(60)
    last = h.store.decisions("m")[-1]
    assert last.action == "rollback" and "drift on the candidate 2" in last.reason
    assert h.policies["m"].weights == {"1": 100}


def test_drift_on_both_versions_is_the_inputs_not_the_candidate(
    tmp_path: Path, monitor: Any
) -> None:
    url, snap = monitor
    snap["models"] = [entry("1", True), entry("2", True)]
    h = Harness(tmp_path, drift=HttpDriftProbe(url, served_name))
    h.ctl.start(spec(canary=SHORT))
    h.run(60)
    assert h.policies["m"].weights == {"2": 100}
    checks = [d for d in h.store.decisions("m") if "drift" in d.numbers]
    assert checks and checks[0].numbers["drift"]["baseline"] == ["input_tokens (ks)"]


def test_no_monitor_means_no_drift_information(tmp_path: Path, monitor: Any) -> None:
    url, _ = monitor
    probe = HttpDriftProbe(url + "/nothing-here", served_name)
    assert probe("m", "2") is None
    assert HttpDriftProbe(lambda: None, served_name)("m", "2") is None
