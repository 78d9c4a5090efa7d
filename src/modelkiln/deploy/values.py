"""Helm-style values from a :class:`DeployConfig`, and the two ways manifests read them.

Every Kubernetes object is built once (:mod:`modelkiln.deploy.k8s`) from a
:class:`ValueSource`. :class:`Plain` returns the values themselves (the ``k8s/``
manifests); :class:`HelmRefs` returns markers that :func:`to_template` turns into Go
template expressions over ``.Values`` (the Helm chart). So the chart and the plain
manifests cannot drift: a test renders the chart with its values.yaml and compares.
"""

from __future__ import annotations

import re
from typing import Any

from modelkiln.deploy.config import GPU_TYPES, DeployConfig


def values(cfg: DeployConfig) -> dict[str, Any]:
    """The chart's values.yaml (the user's override surface)."""
    repo, _, tag = cfg.image.rpartition(":")
    if not repo or "/" in tag:  # "host:5000/img" has no tag
        repo, tag = cfg.image, "latest"
    limits: dict[str, Any] = {"cpu": cfg.resources.cpu_limit, "memory": cfg.resources.memory_limit}
    node_selector: dict[str, str] = {}
    if cfg.gpu:
        limits["nvidia.com/gpu"] = cfg.gpu_count
        node_selector["nvidia.com/gpu.product"] = GPU_TYPES[cfg.gpu]["product"]
    return {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"},
        "replicas": {"min": cfg.replicas_min, "max": cfg.replicas_max},
        "resources": {
            "requests": {"cpu": cfg.resources.cpu_request, "memory": cfg.resources.memory_request},
            "limits": limits,
        },
        "nodeSelector": node_selector,
        "autoscaling": {
            "cpuPercent": cfg.cpu_target_percent,
            "memoryPercent": cfg.memory_target_percent,
            "ongoingRequests": str(cfg.ongoing_requests_target),
        },
        "preStopSleepSeconds": cfg.prestop_sleep_s,
        "hpa": {"enabled": True},
        "keda": {"enabled": False, "prometheusUrl": cfg.prometheus_url},
        "serviceMonitor": {"enabled": True},
        "modelPvc": cfg.model_pvc or "",
        "serveConfig": serve_config(cfg),
    }


def serve_config(cfg: DeployConfig) -> dict[str, Any]:
    """The ServeConfig YAML the server reads from the ConfigMap (``--config``)."""
    return {
        "models": [{"path": cfg.model_arg, "name": cfg.model_name}],
        "host": "0.0.0.0",
        "port": cfg.port,
        "drain_timeout_s": cfg.drain_timeout_s,
    }


class Plain:
    """Reads values directly: the plain manifests."""

    def __init__(self, vals: dict[str, Any], namespace: str) -> None:
        self.vals = vals
        self.namespace = namespace

    def get(self, path: str, kind: str = "n") -> Any:
        """The value at dotted ``path`` (``kind`` matters only to :class:`HelmRefs`)."""
        node: Any = self.vals
        for part in path.split("."):
            node = node[part]
        return node

    def text(self, *parts: str) -> str:
        """Concatenate literal strings and ``.path`` references (``.image.tag``)."""
        return "".join(str(self.get(p[1:])) if p.startswith(".") else p for p in parts)

    def expr(self, go_expr: str, value: Any) -> Any:
        """A computed value: the Go template expression's plain result."""
        return value

    def ns(self) -> str:
        """The namespace."""
        return self.namespace


class HelmRefs(Plain):
    """Returns markers that :func:`to_template` turns into ``{{ .Values.x }}``."""

    def get(self, path: str, kind: str = "n") -> Any:
        super().get(path)  # a typo in a path fails here, not in the chart
        return f"@@{kind}:.Values.{path}@@"

    def text(self, *parts: str) -> str:
        refs = [f"@@s:.Values.{p[1:]}@@" if p.startswith(".") else p for p in parts]
        return "".join(refs)

    def expr(self, go_expr: str, value: Any) -> Any:
        return f"@@n:{go_expr}@@"

    def ns(self) -> str:
        return "@@s:.Release.Namespace@@"


_MARK = re.compile(r"@@([nsbyt]):([^@]+)@@")
_QUOTED = re.compile(r"'([^'\n]*@@[^'\n]*)'")


def _scalar(m: re.Match[str]) -> str:
    inner = m.group(1)
    whole = _MARK.fullmatch(inner)
    if whole and whole.group(1) in "nb":  # a number or a boolean: unquoted
        return "{{ " + whole.group(2) + " }}"
    return '"' + _MARK.sub(lambda x: "{{ " + x.group(2) + " }}", inner) + '"'


def to_template(yaml_text: str) -> str:
    """Turn the markers of a YAML dump made with :class:`HelmRefs` into Go template."""
    out: list[str] = []
    for line in yaml_text.splitlines():
        block = re.fullmatch(r"(\s*)(- )?([^:]+): '@@([yt]):([^@]+)@@'", line)
        if block:  # a mapping (y) or a YAML text (t): toYaml, indented under its key
            indent = len(block.group(1)) + (2 if block.group(2) else 0) + 2
            pipe = " |" if block.group(4) == "t" else ""
            out.append(f"{block.group(1)}{block.group(2) or ''}{block.group(3)}:{pipe}")
            out.append(f"  {{{{- toYaml {block.group(5)} | nindent {indent} }}}}")
            continue
        out.append(_QUOTED.sub(_scalar, line))
    return "\n".join(out) + "\n"
