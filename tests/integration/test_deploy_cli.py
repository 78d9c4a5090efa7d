"""Acceptance: ``kiln deploy docker`` / ``kiln deploy k8s`` on a promoted model directory
write files a reviewer would ship; a bad input is one clear error naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from modelkiln.cli import app
from modelkiln.deploy.validate import validate_compose, validate_k8s

runner = CliRunner()


@pytest.fixture
def promoted(tmp_path: Path) -> Path:
    """Where the quickstart promotes its optimized model (runs/<run>/optimize/model)."""
    path = tmp_path / "runs" / "quickstart" / "optimize" / "model"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (path / "model.onnx").write_bytes(b"onnx")
    return path


def test_kiln_deploy_k8s_writes_shippable_manifests(promoted: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    result = runner.invoke(app, ["deploy", "k8s", str(out), "--model-path", str(promoted),
                                 "--drain-timeout", "60"])  # fmt: skip
    assert result.exit_code == 0, result.output
    docs = [
        d for f in sorted((out / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
    ]
    for doc in docs:
        validate_k8s(doc)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "ServiceMonitor", "ScaledObject", "ConfigMap"}  # fmt: skip
    assert (out / "helm" / "modelkiln" / "values.yaml").is_file()


def test_kiln_deploy_docker_writes_a_safe_stack(promoted: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    result = runner.invoke(app, ["deploy", "docker", str(out), "--model-path", str(promoted)])
    assert result.exit_code == 0, result.output
    compose = yaml.safe_load((out / "compose.yaml").read_text())
    validate_compose(compose)
    every_file = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "admin/admin" not in every_file and "GF_SECURITY_ADMIN_PASSWORD: admin" not in every_file
    dockerfile = (out / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in dockerfile
    hadolint = Path(sys.executable).parent / "hadolint"
    if hadolint.exists():
        run = subprocess.run(
            [str(hadolint), str(out / "Dockerfile")], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stdout


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--model-path", "no/such/dir"], "model_path"),
        (["--replicas-min", "4", "--replicas-max", "2"], "replicas_min"),
        (["--gpu", "nvidia-v9000"], "gpu"),
        (["--set", "resources.memory_limit=4 gigs"], "resources.memory_limit"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(
    promoted: Path, tmp_path: Path, args: list[str], field: str
) -> None:
    base = [] if "--model-path" in args else ["--model-path", str(promoted)]
    result = runner.invoke(app, ["deploy", "k8s", str(tmp_path / "o"), *base, *args])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert any(ln.startswith("error:") and field in ln for ln in lines), result.output
    assert "Traceback" not in result.output


PODMAN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _base_image_present() -> bool:
    if shutil.which("podman") is None:
        return False
    probe = subprocess.run(["podman", "image", "exists", "python:3.11-slim-bookworm"],
                           capture_output=True, timeout=60)  # fmt: skip
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not _base_image_present(),
    reason="podman or the python:3.11-slim-bookworm base image is missing (no registry "
    "access to pull it here; see the deploy section of the README)",
)
def test_podman_builds_the_cpu_image_and_it_becomes_ready(promoted: Path, tmp_path: Path) -> None:
    from serve_support import free_port, save_tiny_gpt2, wait_ready

    model = save_tiny_gpt2(tmp_path / "tiny")
    out = tmp_path / "ctx"
    result = runner.invoke(
        app, ["deploy", "docker", str(out), "--model-path", str(model), "--bake"]
    )
    assert result.exit_code == 0, result.output
    tag = "localhost/modelkiln-test:latest"
    subprocess.run(["podman", "build", *PODMAN_FLAGS, "-t", tag, str(out)], check=True,
                   timeout=1800)  # fmt: skip
    port = free_port()
    name = f"kiln-test-{port}"
    subprocess.run(["podman", "run", "-d", "--rm", "--name", name, *PODMAN_FLAGS, "-p",
                    f"127.0.0.1:{port}:8000", tag], check=True, timeout=120)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=300)
    finally:
        subprocess.run(["podman", "stop", "-t", "40", name], timeout=120, check=False)
