"""``kiln rollout export --k8s``: typed manifests, validated against the shipped schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.errors import ConfigError
from modelkiln.rollout.k8s import validate, write_manifests
from modelkiln.rollout.policy import CanaryConfig

ROOT = Path(__file__).resolve().parents[3]


def _export(tmp: Path) -> tuple[dict, dict]:
    cfg = CanaryConfig(steps=[10, 50, 100], dwell_s=300, check_interval_s=20)
    write_manifests(tmp, "Tiny_Model", "2", cfg, image="reg/srv", prometheus="http://prom:9090")
    ro = yaml.safe_load((tmp / "rollout.yaml").read_text())
    at = yaml.safe_load((tmp / "analysis-template.yaml").read_text())
    return ro, at


def test_rollout_carries_the_ramp(tmp_path: Path) -> None:
    ro, at = _export(tmp_path)
    assert ro["kind"] == "Rollout" and ro["metadata"]["name"] == "tiny-model"
    canary = ro["spec"]["strategy"]["canary"]
    assert canary["steps"] == [
        {"setWeight": 10}, {"pause": {"duration": "300s"}},
        {"setWeight": 50}, {"pause": {"duration": "300s"}},
    ]  # fmt: skip
    assert ro["spec"]["revisionHistoryLimit"] == 3
    assert canary["analysis"]["templates"] == [{"templateName": "tiny-model-slo"}]
    hashes = {a["name"]: a.get("valueFrom") for a in canary["analysis"]["args"]}
    assert hashes["canary-hash"] == {"podTemplateHashValue": "Latest"}
    assert at["metadata"]["name"] == "tiny-model-slo"
    assert {m["interval"] for m in at["spec"]["metrics"]} == {"20s"}


def test_queries_use_the_servers_metric_names(tmp_path: Path) -> None:
    _, at = _export(tmp_path)
    served = (ROOT / "src/modelkiln/serve/metrics.py").read_text()
    for metric in at["spec"]["metrics"]:
        query = metric["provider"]["prometheus"]["query"]
        for name in ("ml_requests_total", "ml_request_duration_seconds"):
            if name in query:
                assert f'"{name}' in served
        assert "[100s]" in query  # 5 checks x 20 s: the handbook's window


def test_schema_rejects_bad_manifests(tmp_path: Path) -> None:
    ro, at = _export(tmp_path)
    ro["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = 150
    with pytest.raises(ConfigError, match="setWeight"):
        validate(ro)
    at["spec"]["metrics"][0]["provder"] = {}
    with pytest.raises(ConfigError, match="provder"):
        validate(at)


def test_export_command(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["rollout", "export", "tiny@3", "--k8s", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "tiny:3" not in res.output and (tmp_path / "rollout.yaml").is_file()
    bad = CliRunner().invoke(app, ["rollout", "export", "tiny", "--k8s", str(tmp_path)])
    assert bad.exit_code == 2 and "names no version" in bad.stderr


def test_start_without_a_gateway_is_a_clear_error() -> None:
    res = CliRunner().invoke(app, ["rollout", "start", "tiny@2", "--url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "cannot reach the gateway" in res.stderr
