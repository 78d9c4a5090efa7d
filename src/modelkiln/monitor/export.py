"""``kiln monitor export DIR``: Prometheus scrape config, alert rules and a Grafana dashboard.

Written from Python data (dict -> YAML / JSON), never from string templates.
The metric names are the server's (:mod:`modelkiln.serve.metrics`:
``ml_requests_total``, ``ml_request_duration_seconds``, ``ml_time_to_first_token_seconds``,
``ml_inter_token_latency_seconds``, ``ml_queue_time_seconds``, ``ml_batch_size``,
``ml_cache_hits_total`` ...) and the monitor's (``ml_drift_score``,
``ml_drift_detected``, ``ml_monitor_profile``).

Example::

    export_monitoring(Path("monitoring"), target="127.0.0.1:8000")
    # monitoring/prometheus.yml  monitoring/kiln-alerts.yml  monitoring/grafana-dashboard.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS_YML = "prometheus.yml"
RULES_YML = "kiln-alerts.yml"
DASHBOARD_JSON = "grafana-dashboard.json"
JOB = "modelkiln"

_RATE = "sum by (model_name) (rate(ml_requests_total[5m]))"


def _q(metric: str, q: float, by: str = "model_name") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[5m])))"


def prometheus_config(
    target: str, *, scrape_interval: str = "15s", rules: str = RULES_YML
) -> dict[str, Any]:
    """The scrape config of one server at ``target`` (host:port) with the rule file."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [rules],
        "scrape_configs": [
            {"job_name": JOB, "metrics_path": "/metrics",
             "static_configs": [{"targets": [target]}]},
        ],
    }  # fmt: skip


def alert_rules(
    *, latency_p95_s: float = 1.0, error_rate: float = 0.05, reject_rate: float = 0.1,
    drift_for: str = "5m", for_: str = "5m",
) -> dict[str, Any]:  # fmt: skip
    """Prometheus alerting rules: down, p95 latency, error rate, 429 rate, drift, no profile."""

    def rule(name: str, expr: str, dur: str, severity: str, summary: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": dur, "labels": {"severity": severity},
                "annotations": {"summary": summary}}  # fmt: skip

    status = 'sum by (model_name) (rate(ml_requests_total{{status=~"{}"}}[5m]))'
    share = "{} / clamp_min(" + _RATE + ", 1e-9) > {}"
    return {"groups": [{"name": "modelkiln", "rules": [
        rule("KilnDown", f'up{{job="{JOB}"}} == 0', "1m", "critical",
             "kiln server {{ $labels.instance }} is down"),
        rule("KilnHighLatencyP95", f"{_q('ml_request_duration_seconds', 0.95)} > {latency_p95_s}",
             for_, "warning", "p95 latency of {{ $labels.model_name }} is {{ $value }} s"),
        rule("KilnHighErrorRate", share.format(status.format("5.."), error_rate), for_,
             "critical", "5xx share of {{ $labels.model_name }} is {{ $value }}"),
        rule("KilnHighRejectionRate", share.format(status.format("429"), reject_rate), for_,
             "warning", "429 share of {{ $labels.model_name }} is {{ $value }} (saturated)"),
        rule("KilnDrift", "max by (model, version, feature, test) (ml_drift_detected) == 1",
             drift_for, "warning",
             "drift on {{ $labels.model }} v{{ $labels.version }}: {{ $labels.feature }}"),
        rule("KilnNoReferenceProfile", 'ml_monitor_profile{status!="ok"} == 1', "10m", "info",
             "{{ $labels.model }} is served without drift monitoring ({{ $labels.status }})"),
    ]}]}  # fmt: skip


#: (title, unit, [(expr, legend)]) of every dashboard panel, in order.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Throughput (requests/s)", "reqps", [(_RATE, "{{model_name}}")]),
    ("Request latency", "s", [(_q("ml_request_duration_seconds", q), f"p{int(q * 100)} "
                               "{{model_name}}") for q in (0.5, 0.95, 0.99)]),
    ("Time to first token", "s", [(_q("ml_time_to_first_token_seconds", q),
                                   f"p{int(q * 100)} {{{{model_name}}}}") for q in (0.5, 0.95)]),
    ("Time per output token", "s", [(_q("ml_inter_token_latency_seconds", q),
                                     f"p{int(q * 100)} {{{{model_name}}}}") for q in (0.5, 0.95)]),
    ("Queue time p95", "s", [(_q("ml_queue_time_seconds", 0.95), "{{model_name}}")]),
    ("Batch size (mean)", "short", [(
        "sum by (model_name) (rate(ml_batch_size_sum[5m])) / "
        "clamp_min(sum by (model_name) (rate(ml_batch_size_count[5m])), 1e-9)", "{{model_name}}")]),
    ("Response cache hit ratio", "percentunit", [(
        "sum by (model_name) (rate(ml_cache_hits_total[5m])) / clamp_min(sum by (model_name) "
        "(rate(ml_cache_hits_total[5m])) + sum by (model_name) (rate(ml_cache_misses_total[5m])),"
        " 1e-9)", "{{model_name}}")]),
    ("Rejections by reason", "reqps", [("sum by (reason) (rate(ml_rejections_total[5m]))",
                                        "{{reason}}")]),
    ("Requests in flight", "short", [("sum(ml_requests_in_flight)", "in flight")]),
    ("Drift score per feature (1 = threshold)", "short", [(
        "max by (model, version, feature) (ml_drift_score)",
        "{{model}} v{{version}} {{feature}}")]),
    ("Drift detected", "short", [("max by (model, version, feature) (ml_drift_detected)",
                                  "{{model}} v{{version}} {{feature}}")]),
    ("Firing alerts", "short", [('count by (alertname) (ALERTS{alertstate="firing"})',
                                 "{{alertname}}")]),
]  # fmt: skip


def grafana_dashboard(title: str = "modelkiln serving") -> dict[str, Any]:
    """A Grafana dashboard (JSON model, schemaVersion 39) over a Prometheus datasource."""
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = []
    for i, (name, unit, queries) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": name, "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + j), "expr": e, "legendFormat": legend,
                         "datasource": ds} for j, (e, legend) in enumerate(queries)],
        })  # fmt: skip
    return {
        "uid": "modelkiln-serving", "title": title, "tags": ["modelkiln"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "DS_PROMETHEUS", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "annotations": {"list": []}, "panels": panels,
    }  # fmt: skip


def export_monitoring(
    out: str | Path, *, target: str = "127.0.0.1:8000", scrape_interval: str = "15s",
    drift_for: str = "5m",
) -> list[Path]:  # fmt: skip
    """Write the three files into ``out`` and return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        PROMETHEUS_YML: yaml.safe_dump(prometheus_config(target, scrape_interval=scrape_interval),
                                       sort_keys=False),
        RULES_YML: yaml.safe_dump(alert_rules(drift_for=drift_for), sort_keys=False, width=200),
        DASHBOARD_JSON: json.dumps(grafana_dashboard(), indent=2) + "\n",
    }  # fmt: skip
    for name, text in files.items():
        (out / name).write_text(text)
    return [out / n for n in files]
