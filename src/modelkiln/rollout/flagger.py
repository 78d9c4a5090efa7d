"""``kiln rollout export --k8s --flagger``: the same canary as a Flagger ``Canary`` with
``MetricTemplate`` objects on Prometheus queries of this server's metrics.

Flagger moves one step per analysis interval when every metric passes, and rolls back
after ``threshold`` failed checks. To keep the handbook's dwell (10 min per step with a
check every 30 s), each step weight is repeated ``dwell / interval`` times in
``stepWeights``: the weight stays while the checks run. Flagger names the canary pods
``<target>-<hash>`` and the baseline pods ``<target>-primary-<hash>``; the queries select
them by the ``pod`` label, so every gate compares with the primary at the same time.
"""

from __future__ import annotations

import math
from typing import Any

from modelkiln.rollout.policy import CanaryConfig

API = "flagger.app/v1beta1"
CANARY_PODS = "{{ target }}-[0-9a-zA-Z]+-[0-9a-zA-Z]+"
PRIMARY_PODS = "{{ target }}-primary-[0-9a-zA-Z]+-[0-9a-zA-Z]+"


def _queries(model: str) -> dict[str, str]:
    def sel(pods: str, extra: str = "") -> str:
        return f'namespace="{{{{ namespace }}}}",model_name="{model}",pod=~"{pods}"{extra}'

    def err(pods: str) -> str:
        bad, every = sel(pods, ',status=~"5.."'), sel(pods)
        return (
            f"sum(rate(ml_requests_total{{{bad}}}[{{{{ interval }}}}]))"
            f" / clamp_min(sum(rate(ml_requests_total{{{every}}}[{{{{ interval }}}}])), 1e-9)"
        )

    def p95(pods: str) -> str:
        return (
            "histogram_quantile(0.95, sum by (le) (rate(ml_request_duration_seconds_bucket"
            f"{{{sel(pods)}}}[{{{{ interval }}}}]))) * 1000"
        )

    return {
        "error-rate": err(CANARY_PODS),
        "error-rate-vs-primary": f"({err(CANARY_PODS)}) - ({err(PRIMARY_PODS)})",
        "latency-p95-ms": p95(CANARY_PODS),
        "latency-p95-vs-primary": f"({p95(CANARY_PODS)}) / clamp_min({p95(PRIMARY_PODS)}, 1)",
    }


def metric_templates(app: str, model: str, prometheus: str) -> list[dict[str, Any]]:
    """One ``MetricTemplate`` per gate (absolute and versus the primary)."""
    return [
        {
            "apiVersion": API,
            "kind": "MetricTemplate",
            "metadata": {"name": f"{app}-{name}", "labels": {"app": app}},
            "spec": {"provider": {"type": "prometheus", "address": prometheus}, "query": query},
        }
        for name, query in _queries(model).items()
    ]


def canary(app: str, cfg: CanaryConfig, port: int = 8000) -> dict[str, Any]:
    """The ``Canary`` of the Deployment ``app`` (as ``kiln deploy k8s`` names it)."""
    interval = f"{round(cfg.check_interval_s)}s"
    window = f"{round(cfg.check_interval_s * cfg.window)}s"
    repeat = max(1, math.ceil(cfg.dwell_s / cfg.check_interval_s))
    limits = {
        "error-rate": cfg.max_error_rate, "error-rate-vs-primary": cfg.max_error_rate / 2,
        "latency-p95-ms": cfg.max_latency_ms, "latency-p95-vs-primary": 1.5,
    }  # fmt: skip
    metrics = [
        {
            "name": name,
            "templateRef": {"name": f"{app}-{name}"},
            "thresholdRange": {"max": limit},
            "interval": window,
        }
        for name, limit in limits.items()
    ]
    return {
        "apiVersion": API, "kind": "Canary",
        "metadata": {"name": app, "labels": {"app": app}},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
            "service": {"port": port, "targetPort": port},
            "analysis": {
                "interval": interval, "threshold": 1,
                "stepWeights": [w for w in cfg.steps[:-1] for _ in range(repeat)],
                "metrics": metrics,
            },
        },
    }  # fmt: skip
