"""kiln monitor export: promtool accepts the rules and config; the dashboard fits Grafana's
JSON model and every panel query parses as PromQL. (Grafana itself is not installable here:
no Debian or PyPI package, so the dashboard is checked against its JSON model instead.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from modelkiln.monitor.export import (
    DASHBOARD_JSON,
    PROMETHEUS_YML,
    RULES_YML,
    export_monitoring,
    grafana_dashboard,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/ensure-test-services.sh)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_and_config_pass_promtool(tmp_path: Path) -> None:
    export_monitoring(tmp_path, target="127.0.0.1:9999")
    rules = promtool("check", "rules", str(tmp_path / RULES_YML))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 6 rules found" in rules.stdout
    conf = promtool("check", "config", str(tmp_path / PROMETHEUS_YML))
    assert conf.returncode == 0, conf.stdout + conf.stderr
    names = {r["alert"] for r in yaml.safe_load((tmp_path / RULES_YML).read_text())["groups"][0]
             ["rules"]}  # fmt: skip
    assert names >= {"KilnDown", "KilnHighLatencyP95", "KilnHighErrorRate",
                     "KilnHighRejectionRate", "KilnDrift"}  # fmt: skip


@needs_promtool
def test_a_broken_rule_is_caught_by_promtool(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "X", "expr": "sum(rate(ml_requests_total[5m])"}]}]}))  # fmt: skip
    assert promtool("check", "rules", str(bad)).returncode != 0


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    exprs = [t["expr"] for p in grafana_dashboard()["panels"] for t in p["targets"]]
    rules = [{"record": f"kiln:panel_{i}", "expr": e} for i, e in enumerate(exprs)]
    f = tmp_path / "panels.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = promtool("check", "rules", str(f))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_follows_grafanas_json_model(tmp_path: Path) -> None:
    export_monitoring(tmp_path)
    d = json.loads((tmp_path / DASHBOARD_JSON).read_text())
    assert {"uid", "title", "schemaVersion", "panels", "templating", "time"} <= set(d)
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in d["panels"])
    for want in ("Throughput", "latency", "first token", "per output token", "Queue",
                 "Batch", "cache", "Rejections", "Drift score", "alerts"):  # fmt: skip
        assert want.lower() in titles.lower(), want
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in d["panels"]:
        g = p["gridPos"]
        assert p["type"] in {"timeseries", "stat", "table", "state-timeline"}
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        assert p["datasource"]["uid"].strip("${}") in variables
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
