"""Kubernetes manifests and the Helm chart: schema-valid, safe to ship, chart == manifests."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_render import render

from modelkiln.deploy.config import load_deploy_config
from modelkiln.deploy.k8s import K8S_VERSION
from modelkiln.deploy.kube import chart_templates, manifests, write_k8s
from modelkiln.deploy.validate import ManifestInvalidError, validate_k8s
from modelkiln.deploy.values import values


def _pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(objs["deployment"]["spec"]["template"]["spec"])


@pytest.mark.parametrize("gpu", [None, "nvidia-a100"])
def test_every_object_validates_against_its_schema(model_dir: Path, gpu: str | None) -> None:
    cfg = load_deploy_config(model_path=model_dir, gpu=gpu, model_pvc="models")
    objs = manifests(cfg)
    assert set(objs) == {"configmap", "deployment", "service", "pdb", "hpa", "servicemonitor",
                         "scaledobject"}  # fmt: skip
    for obj in objs.values():
        validate_k8s(obj)  # k8s 1.33 strict, or the vendored CRD schema


def test_validation_rejects_a_broken_object(model_dir: Path) -> None:
    objs = manifests(load_deploy_config(model_path=model_dir))
    bad = copy.deepcopy(objs["deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/"
    with pytest.raises(ManifestInvalidError, match="pathh"):
        validate_k8s(bad)
    monitor = copy.deepcopy(objs["servicemonitor"])
    monitor["spec"]["endpoints"][0]["interval"] = 15
    with pytest.raises(ManifestInvalidError, match="interval"):
        validate_k8s(monitor)
    assert K8S_VERSION.startswith("1.")


def test_probes_match_the_server_routes(model_dir: Path) -> None:
    from modelkiln.serve.app import create_app
    from modelkiln.serve.config import ServeConfig

    app = create_app(ServeConfig.model_validate({"models": [{"path": "x", "name": "lm"}]}),
                     engines={"lm": object()})  # fmt: skip
    routes = set(app.openapi()["paths"])
    container = _pod(manifests(load_deploy_config(model_path=model_dir)))["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == "http"
    monitor = manifests(load_deploy_config(model_path=model_dir))["servicemonitor"]
    assert monitor["spec"]["endpoints"][0]["path"] in routes


def test_grace_period_covers_prestop_and_drain(model_dir: Path) -> None:
    from modelkiln.serve.config import ServeConfig

    cfg = load_deploy_config(model_path=model_dir, drain_timeout_s=45)
    objs = manifests(cfg)
    pod = _pod(objs)
    sleep = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    served = ServeConfig.model_validate(yaml.safe_load(objs["configmap"]["data"]["serve.yaml"]))
    assert served.drain_timeout_s == 45
    assert pod["terminationGracePeriodSeconds"] > sleep + served.drain_timeout_s
    # The deploy default is the server's own default.
    assert load_deploy_config(model_path=model_dir).drain_timeout_s == (
        ServeConfig.model_fields["drain_timeout_s"].default
    )


def test_pod_is_non_root_with_read_only_root_and_writable_tmp(model_dir: Path) -> None:
    pod = _pod(manifests(load_deploy_config(model_path=model_dir)))
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"]]
    assert {r["key"] for r in secret_refs} == {"api-keys", "admin-keys"}
    assert all("value" not in e for e in container["env"])  # keys only by reference


def test_hpa_has_the_handbook_targets_and_a_pods_metric(model_dir: Path) -> None:
    spec = manifests(load_deploy_config(model_path=model_dir))["hpa"]["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    by_type = {(m["type"], m.get("resource", {}).get("name")): m for m in spec["metrics"]}
    assert by_type[("Resource", "cpu")]["resource"]["target"]["averageUtilization"] == 70
    assert by_type[("Resource", "memory")]["resource"]["target"]["averageUtilization"] == 80
    pods = by_type[("Pods", None)]["pods"]
    assert pods["metric"]["name"] == "ml_requests_in_flight"
    from modelkiln.serve.metrics import ServeMetrics

    assert "ml_requests_in_flight" in ServeMetrics().render().decode()


def test_gpu_requests_the_device_and_selects_the_product(model_dir: Path) -> None:
    pod = _pod(manifests(load_deploy_config(model_path=model_dir, gpu="nvidia-h100", gpu_count=2)))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_registry_model_is_passed_through(model_dir: Path) -> None:
    cfg = load_deploy_config(model="registry://team/coder@3")
    served = yaml.safe_load(manifests(cfg)["configmap"]["data"]["serve.yaml"])
    assert served["models"] == [{"path": "registry://team/coder@3", "name": "coder"}]


def _rendered(cfg: Any, vals: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, text in chart_templates(cfg).items():
        doc = render(text, vals, cfg.namespace)
        if doc is not None:
            out[name.removesuffix(".yaml")] = doc
    return out


def test_chart_renders_to_the_plain_manifests(model_dir: Path) -> None:
    cfg = load_deploy_config(model_path=model_dir, gpu="nvidia-t4", model_pvc="models")
    vals = values(cfg)
    plain = manifests(cfg)
    rendered = _rendered(cfg, vals)
    assert rendered == {k: v for k, v in plain.items() if k != "scaledobject"}  # keda off
    # values.yaml drives the chart: overriding it equals building from the same values.
    vals["replicas"]["max"] = 20
    vals["resources"]["limits"]["memory"] = "8Gi"
    vals["keda"]["enabled"], vals["hpa"]["enabled"] = True, False
    vals["serveConfig"]["drain_timeout_s"] = 90
    rendered = _rendered(cfg, vals)
    plain = manifests(cfg, vals)
    assert rendered["scaledobject"] == plain["scaledobject"]
    assert "hpa" not in rendered
    assert (
        rendered["deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 100
    )
    for obj in rendered.values():
        validate_k8s(obj)


def test_write_k8s_writes_files_and_chart(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_k8s(load_deploy_config(model_path=model_dir), out)
    docs = list(yaml.safe_load_all((out / "k8s" / "all.yaml").read_text()))
    kinds = ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    assert [d["kind"] for d in docs] == kinds
    chart = out / "helm" / "modelkiln"
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["apiVersion"] == "v2"
    assert yaml.safe_load((chart / "values.yaml").read_text())["replicas"] == {"min": 2, "max": 10}
    assert (chart / "templates" / "deployment.yaml").is_file()


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed on this machine")
def test_helm_template_renders_valid_objects(model_dir: Path, tmp_path: Path) -> None:
    write_k8s(load_deploy_config(model_path=model_dir), tmp_path)
    text = subprocess.run(["helm", "template", "kiln", str(tmp_path / "helm" / "modelkiln")],
                          check=True, capture_output=True, text=True).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs:
        validate_k8s(doc)
