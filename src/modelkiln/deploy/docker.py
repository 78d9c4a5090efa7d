"""``kiln deploy docker``: Dockerfiles, .dockerignore, compose.yaml and the monitoring files.

The compose stack is the handbook's (server, Redis, Prometheus, Grafana) with its bugs
fixed: no admin/admin (Grafana and Redis passwords come from the environment and compose
refuses to start without them), a healthcheck that needs no curl, read-only containers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from modelkiln.deploy import monitoring
from modelkiln.deploy._yaml import dump, write
from modelkiln.deploy.config import MODEL_MOUNT, DeployConfig
from modelkiln.deploy.dockerfile import dockerfile, dockerignore
from modelkiln.deploy.validate import validate_compose, validators_installed

REDIS_IMAGE = "redis:7.4-alpine"
PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
GRAFANA_IMAGE = "grafana/grafana:11.3.0"
#: Variables the stack needs; ``.env.example`` lists them, compose fails when unset.
SECRET_VARS = ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def _required(var: str) -> str:
    return "${" + var + ":?set " + var + " in .env (see .env.example)}"


def _server(cfg: DeployConfig) -> dict[str, Any]:
    cache = f"redis://:{_required('REDIS_PASSWORD')}@redis:6379/0"
    svc: dict[str, Any] = {
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "image": cfg.image,
        "command": [*cfg.serve_args(), "--cache-url", cache],
        "ports": [f"{cfg.port}:{cfg.port}"],
        "environment": {
            "MODELKILN_API_KEYS": "${MODELKILN_API_KEYS:-}",
            "MODELKILN_ADMIN_KEYS": "${MODELKILN_ADMIN_KEYS:-}",
        },
        "read_only": True,
        "tmpfs": ["/tmp"],
        "security_opt": ["no-new-privileges:true"],
        "stop_grace_period": f"{cfg.grace_period_s}s",
        "depends_on": {"redis": {"condition": "service_healthy"}},
        "restart": "unless-stopped",
    }
    if not cfg.bake_model and cfg.model_path is not None:
        src = Path(cfg.model_path).resolve()
        svc["volumes"] = [
            {"type": "bind", "source": str(src), "target": f"{MODEL_MOUNT}/{cfg.model_name}",
             "read_only": True}
        ]  # fmt: skip
    if cfg.gpu:
        svc["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [
                        {"driver": "nvidia", "count": cfg.gpu_count, "capabilities": ["gpu"]}
                    ]
                }
            }
        }
    return svc


def compose(cfg: DeployConfig) -> dict[str, Any]:
    """The compose.yaml document (Compose specification, no ``version:`` key)."""
    pw = _required("REDIS_PASSWORD")
    return {
        "name": cfg.name,
        "services": {
            "server": _server(cfg),
            "redis": {
                "image": REDIS_IMAGE,
                "command": [
                    "redis-server",
                    "--requirepass",
                    pw,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                "healthcheck": {
                    "test": ["CMD", "redis-cli", "-a", pw, "--no-auth-warning", "ping"],
                    "interval": "5s",
                    "timeout": "3s",
                    "retries": 10,
                },
                "read_only": True,
                "tmpfs": ["/data"],
                "restart": "unless-stopped",
            },
            "prometheus": {
                "image": PROMETHEUS_IMAGE,
                "command": [
                    "--config.file=/etc/prometheus/prometheus.yml",
                    "--storage.tsdb.path=/prometheus",
                ],
                "volumes": ["./prometheus:/etc/prometheus:ro", "prometheus-data:/prometheus"],
                "ports": ["9090:9090"],
                "restart": "unless-stopped",
            },
            "grafana": {
                "image": GRAFANA_IMAGE,
                "environment": {
                    "GF_SECURITY_ADMIN_USER": "${GRAFANA_ADMIN_USER:-kiln-admin}",
                    "GF_SECURITY_ADMIN_PASSWORD": _required("GRAFANA_ADMIN_PASSWORD"),
                    "GF_AUTH_ANONYMOUS_ENABLED": "false",
                    "GF_USERS_ALLOW_SIGN_UP": "false",
                },
                "volumes": [
                    "./grafana/provisioning:/etc/grafana/provisioning:ro",
                    "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
                    "grafana-data:/var/lib/grafana",
                ],
                "ports": ["3000:3000"],
                "depends_on": ["prometheus"],
                "restart": "unless-stopped",
            },
        },
        "volumes": {"prometheus-data": {}, "grafana-data": {}},
    }


def _env_example() -> str:
    lines = ["# Copy to .env and fill in; compose refuses to start while these are empty."]
    lines += [f"{v}=" for v in SECRET_VARS]
    lines += ["GRAFANA_ADMIN_USER=kiln-admin", "MODELKILN_API_KEYS=", "MODELKILN_ADMIN_KEYS="]
    return "\n".join(lines) + "\n"


def write_docker(cfg: DeployConfig, out: str | Path) -> list[Path]:
    """Write Dockerfile (CPU), Dockerfile.cuda, .dockerignore, compose.yaml, monitoring files.

    Returns the written paths. With ``cfg.bake_model`` the model is copied to ``out/model``.
    compose.yaml is validated against the Compose spec first (when jsonschema is installed).
    """
    out = Path(out)
    target = f"server:{cfg.port}"
    stack = compose(cfg)
    if validators_installed():
        validate_compose(stack)
    files: dict[str, str] = {
        "Dockerfile": dockerfile(cfg, "cpu"),
        "Dockerfile.cuda": dockerfile(cfg, "cuda"),
        ".dockerignore": dockerignore(),
        ".env.example": _env_example(),
        "compose.yaml": dump(stack),
        "prometheus/prometheus.yml": dump(monitoring.prometheus_config(cfg, target)),
        "prometheus/rules/modelkiln.yml": dump(monitoring.prometheus_rules(cfg)),
        "grafana/provisioning/datasources/prometheus.yml": dump(monitoring.grafana_datasource()),
        "grafana/provisioning/dashboards/modelkiln.yml": dump(
            monitoring.grafana_dashboard_provider()
        ),
        "grafana/dashboards/modelkiln.json": json.dumps(
            monitoring.grafana_dashboard(cfg), indent=2
        ),
    }
    written = [write(out / rel, text) for rel, text in files.items()]
    if cfg.bake_model and cfg.model_path is not None:
        dest = out / "model"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(cfg.model_path, dest)
        written.append(dest)
    return written
