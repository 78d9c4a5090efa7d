"""``kiln rollout export --k8s``: typed manifests, validated against the shipped schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.errors import ConfigError
from modelkiln.rollout.crd import published_schema, validate
from modelkiln.rollout.k8s import write_manifests
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


def test_published_schemas_reject_bad_manifests(tmp_path: Path) -> None:
    ro, at = _export(tmp_path)
    validate(ro)
    validate(at)
    ro["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "ten"
    with pytest.raises(ConfigError, match="setWeight.*'ten' is not of type 'integer'"):
        validate(ro)
    at["spec"]["metrics"][0]["provder"] = {}  # a typo the API server would prune silently
    with pytest.raises(ConfigError, match="provder"):
        validate(at)
    with pytest.raises(ConfigError, match="no CRD schema"):
        validate({"apiVersion": "argoproj.io/v1alpha1", "kind": "Experiment"})


def test_vendored_schemas_are_the_published_crds() -> None:
    # the big Argo schemas carry the whole pod template, not a hand-written subset
    ro = published_schema("argoproj.io/v1alpha1", "Rollout")
    pod = ro["properties"]["spec"]["properties"]["template"]["properties"]["spec"]
    assert "initContainers" in pod["properties"] and "containers" in pod["required"]
    canary = published_schema("flagger.app/v1beta1", "Canary")
    assert canary["properties"]["spec"]["required"] == ["targetRef", "analysis"]
    sources = (ROOT / "src/modelkiln/rollout/schemas/SOURCES.md").read_text()
    assert "9f8d111d8f8e3e88b6d7f8bbdf62fd3cd863ef9d" in sources and "Apache" in sources
    packaged = (ROOT / "pyproject.toml").read_text()
    assert "rollout/schemas/*.json.gz" in packaged and "rollout/schemas/*.txt" in packaged


def test_flagger_canary_and_metric_templates(tmp_path: Path) -> None:
    cfg = CanaryConfig(steps=[10, 50, 100], dwell_s=300, check_interval_s=20, max_error_rate=0.02)
    files = write_manifests(tmp_path, "Tiny_Model", "2", cfg, image="reg/srv",
                            prometheus="http://prom:9090", flagger=True)  # fmt: skip
    assert [f.name for f in files] == ["canary.yaml", "metric-templates.yaml"]
    [can] = list(yaml.safe_load_all(files[0].read_text()))
    templates = list(yaml.safe_load_all(files[1].read_text()))
    analysis = can["spec"]["analysis"]
    assert analysis["interval"] == "20s" and analysis["stepWeights"] == [10] * 15 + [50] * 15
    assert can["spec"]["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": "tiny-model"}  # fmt: skip
    refs = {m["templateRef"]["name"] for m in analysis["metrics"]}
    assert refs == {t["metadata"]["name"] for t in templates}
    assert {m["thresholdRange"]["max"] for m in analysis["metrics"]} >= {0.02, 0.01}
    for t in templates:
        assert 'model_name="Tiny_Model"' in t["spec"]["query"]
    vs = [t for t in templates if t["metadata"]["name"].endswith("-vs-primary")]
    assert len(vs) == 2 and all("primary" in t["spec"]["query"] for t in vs)
    bad = dict(can, spec=dict(can["spec"], analysis=dict(analysis, threshold="one")))
    with pytest.raises(ConfigError, match="threshold"):
        validate(bad)
    res = CliRunner().invoke(
        app, ["rollout", "export", "tiny@3", "--k8s", str(tmp_path / "f"), "--flagger"]
    )
    assert res.exit_code == 0 and "published Flagger CRD schema" in res.output, res.output


def test_export_command(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["rollout", "export", "tiny@3", "--k8s", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "tiny:3" not in res.output and (tmp_path / "rollout.yaml").is_file()
    bad = CliRunner().invoke(app, ["rollout", "export", "tiny", "--k8s", str(tmp_path)])
    assert bad.exit_code == 2 and "names no version" in bad.stderr


def test_start_without_a_gateway_is_a_clear_error() -> None:
    res = CliRunner().invoke(app, ["rollout", "start", "tiny@2", "--url", "http://127.0.0.1:9"])
    assert res.exit_code == 2 and "cannot reach the gateway" in res.stderr
