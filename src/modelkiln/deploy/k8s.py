"""Kubernetes objects of one model server, built from values (see :mod:`.values`).

Deployment (probes on the server's /health and /ready, preStop + grace period covering
the drain, non-root with a read-only root filesystem), Service, HorizontalPodAutoscaler
(autoscaling/v2: CPU, memory and in-flight requests per pod), PodDisruptionBudget,
ConfigMap (the serve config), ServiceMonitor (Prometheus operator) and a KEDA
ScaledObject (Prometheus trigger; an alternative to the HPA, never both at once).
"""

from __future__ import annotations

from typing import Any

from modelkiln.deploy.config import (
    IN_FLIGHT_METRIC,
    LIVENESS_PATH,
    METRICS_PATH,
    MODEL_MOUNT,
    READINESS_PATH,
    DeployConfig,
)
from modelkiln.deploy.dockerfile import UID
from modelkiln.deploy.values import Plain

#: Kubernetes version the manifests are validated against (kubernetes-validate schemas).
K8S_VERSION = "1.33.0"
CONFIG_DIR = "/etc/modelkiln"


def _meta(cfg: DeployConfig, v: Plain, suffix: str = "") -> dict[str, Any]:
    return {"name": cfg.name + suffix, "namespace": v.ns(), "labels": labels(cfg)}


def labels(cfg: DeployConfig) -> dict[str, str]:
    """Labels of every object (the selector uses the first two)."""
    return {
        "app.kubernetes.io/name": cfg.name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/part-of": "modelkiln",
    }


def selector(cfg: DeployConfig) -> dict[str, str]:
    """Pod selector of the Deployment, Service, PDB and ServiceMonitor."""
    return {k: v for k, v in labels(cfg).items() if k != "app.kubernetes.io/part-of"}


def _secret_env(cfg: DeployConfig, var: str, key: str) -> dict[str, Any]:
    ref = {"name": f"{cfg.name}-keys", "key": key, "optional": True}
    return {"name": var, "valueFrom": {"secretKeyRef": ref}}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _container(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "serve-config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    if cfg.model_pvc:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    return {
        "name": "server",
        "image": v.text(".image.repository", ":", ".image.tag"),
        "imagePullPolicy": v.get("image.pullPolicy", "s"),
        "args": ["--config", f"{CONFIG_DIR}/serve.yaml"],
        "ports": [{"name": "http", "containerPort": cfg.port, "protocol": "TCP"}],
        "env": [
            _secret_env(cfg, "MODELKILN_API_KEYS", "api-keys"),
            _secret_env(cfg, "MODELKILN_ADMIN_KEYS", "admin-keys"),
        ],
        "resources": v.get("resources", "y"),
        # /health answers while models load (liveness); /ready only once they serve.
        "livenessProbe": _probe(LIVENESS_PATH, 10, 3),
        "readinessProbe": _probe(READINESS_PATH, 5, 2),
        "startupProbe": _probe(LIVENESS_PATH, 5, 24),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", v.text(".preStopSleepSeconds")]}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def deployment(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """The server Deployment."""
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
        {"name": "serve-config", "configMap": {"name": f"{cfg.name}-serve-config"}},
    ]
    if cfg.model_pvc:
        claim = {"claimName": v.get("modelPvc", "s"), "readOnly": True}
        volumes.append({"name": "model", "persistentVolumeClaim": claim})
    grace = v.expr(
        "add .Values.preStopSleepSeconds .Values.serveConfig.drain_timeout_s 5", cfg.grace_period_s
    )
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": v.get("nodeSelector", "y"),
        "containers": [_container(cfg, v)],
        "volumes": volumes,
    }
    if cfg.gpu:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, v),
        "spec": {
            "replicas": v.get("replicas.min"),
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(cfg)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {"metadata": {"labels": labels(cfg)}, "spec": pod},
        },
    }


def service(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """ClusterIP Service on port 80 -> the container's http port."""
    port = {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, v),
        "spec": {"type": "ClusterIP", "selector": selector(cfg), "ports": [port]},
    }


def hpa(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """autoscaling/v2 HPA: CPU, memory and in-flight requests per pod (prometheus-adapter)."""

    def resource(name: str, key: str) -> dict[str, Any]:
        target = {"type": "Utilization", "averageUtilization": v.get(f"autoscaling.{key}")}
        return {"type": "Resource", "resource": {"name": name, "target": target}}

    pods = {
        "metric": {"name": IN_FLIGHT_METRIC},
        "target": {
            "type": "AverageValue",
            "averageValue": v.get("autoscaling.ongoingRequests", "s"),
        },
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(cfg, v),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
            "minReplicas": v.get("replicas.min"),
            "maxReplicas": v.get("replicas.max"),
            "metrics": [
                resource("cpu", "cpuPercent"),
                resource("memory", "memoryPercent"),
                {"type": "Pods", "pods": pods},
            ],
            # Scale down slowly: a model replica is expensive to bring back.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def pdb(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """PodDisruptionBudget: voluntary evictions take one pod at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cfg, v),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(cfg)}},
    }


def configmap(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """The serve config, mounted at /etc/modelkiln/serve.yaml."""
    from modelkiln.deploy._yaml import dump

    text = v.get("serveConfig", "t")
    data = text if isinstance(text, str) and text.startswith("@@") else dump(text)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, v, "-serve-config"),
        "data": {"serve.yaml": data},
    }


def service_monitor(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """Prometheus operator ServiceMonitor scraping /metrics on the http port."""
    endpoint = {"port": "http", "path": METRICS_PATH, "interval": "15s"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(cfg, v),
        "spec": {"selector": {"matchLabels": selector(cfg)}, "endpoints": [endpoint]},
    }


def scaled_object(cfg: DeployConfig, v: Plain) -> dict[str, Any]:
    """KEDA ScaledObject: in-flight requests from Prometheus plus CPU (replaces the HPA)."""
    query = f'sum({IN_FLIGHT_METRIC}{{namespace="{cfg.namespace}",pod=~"{cfg.name}-.*"}})'
    prom = {
        "serverAddress": v.get("keda.prometheusUrl", "s"),
        "query": query,
        "threshold": v.get("autoscaling.ongoingRequests", "s"),
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(cfg, v),
        "spec": {
            "scaleTargetRef": {"name": cfg.name},
            "minReplicaCount": v.get("replicas.min"),
            "maxReplicaCount": v.get("replicas.max"),
            "cooldownPeriod": 300,
            "triggers": [
                {"type": "prometheus", "metadata": prom},
                {
                    "type": "cpu",
                    "metricType": "Utilization",
                    "metadata": {"value": v.text(".autoscaling.cpuPercent")},
                },
            ],
        },
    }


#: File name -> builder, and the values flag that turns the object on in the chart.
OBJECTS: dict[str, tuple[Any, str | None]] = {
    "configmap": (configmap, None),
    "deployment": (deployment, None),
    "service": (service, None),
    "pdb": (pdb, None),
    "hpa": (hpa, "hpa.enabled"),
    "servicemonitor": (service_monitor, "serviceMonitor.enabled"),
    "scaledobject": (scaled_object, "keda.enabled"),
}
