"""Prometheus and Grafana files for the compose stack.

The monitor package owns the real alert rules and dashboard (``kiln monitor export``,
:mod:`modelkiln.monitor.export`); they are used when that module is importable, else a
minimal set over the server's own metrics (request rate, errors, p95 latency,
readiness) is written so the stack still works. The import is lazy and optional: the
deploy package never needs monitor's internals to generate files.
"""

from __future__ import annotations

import importlib
from typing import Any

from modelkiln.deploy.config import IN_FLIGHT_METRIC, METRICS_PATH, DeployConfig

PROMETHEUS_UID = "prometheus"


def _monitor() -> Any | None:
    """:mod:`modelkiln.monitor.export` when installed (lazy, optional)."""
    try:
        return importlib.import_module("modelkiln.monitor.export")
    except ImportError:
        return None


def _from_monitor(name: str) -> Any | None:
    """``modelkiln.monitor.export.<name>()`` when that module offers it."""
    fn = getattr(_monitor(), name, None)
    return fn() if callable(fn) else None


def job_name(cfg: DeployConfig) -> str:
    """Scrape job name: the monitor rules' (their 'down' alert selects on it), else the app."""
    return str(getattr(_monitor(), "JOB", cfg.name))


def prometheus_config(cfg: DeployConfig, target: str) -> dict[str, Any]:
    """prometheus.yml scraping the server at ``target`` (host:port) and loading the rules."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["/etc/prometheus/rules/*.yml"],
        "scrape_configs": [
            {
                "job_name": job_name(cfg),
                "metrics_path": METRICS_PATH,
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


def _minimal_rules(cfg: DeployConfig) -> dict[str, Any]:
    err = (
        'sum(rate(ml_requests_total{status=~"5.."}[5m])) '
        "/ clamp_min(sum(rate(ml_requests_total[5m])), 1e-9)"
    )
    rate = "sum(rate(ml_requests_total[5m]))"
    p95 = "histogram_quantile(0.95, sum by (le) (rate(ml_request_duration_seconds_bucket[5m])))"
    return {
        "groups": [
            {
                "name": f"{cfg.name}-serving",
                "rules": [
                    {"record": "modelkiln:request_rate:5m", "expr": rate},
                    {"record": "modelkiln:latency_p95:5m", "expr": p95},
                    {"record": "modelkiln:in_flight", "expr": f"sum({IN_FLIGHT_METRIC})"},
                    {
                        "alert": "ModelkilnHighErrorRate",
                        "expr": f"{err} > 0.05",
                        "for": "5m",
                        "labels": {"severity": "page"},
                        "annotations": {"summary": "more than 5% of requests fail with 5xx"},
                    },
                    {
                        "alert": "ModelkilnNotReady",
                        "expr": "min(ml_ready) < 1",
                        "for": "10m",
                        "labels": {"severity": "ticket"},
                        "annotations": {"summary": "a server has not been ready for 10 min"},
                    },
                ],
            }
        ]
    }  # fmt: skip


def prometheus_rules(cfg: DeployConfig) -> dict[str, Any]:
    """Alert and recording rules: the monitor package's, else the minimal set."""
    return _from_monitor("alert_rules") or _minimal_rules(cfg)


def _panel(pid: int, title: str, expr: str, unit: str, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": PROMETHEUS_UID},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr}],
    }


def grafana_dashboard(cfg: DeployConfig) -> dict[str, Any]:
    """The serving dashboard: the monitor package's, else four panels."""
    found = _from_monitor("grafana_dashboard")
    if found:
        return dict(found)
    return {
        "uid": f"{cfg.name}-serving",
        "title": f"{cfg.name} serving",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "panels": [
            _panel(1, "Requests / s", "sum(rate(ml_requests_total[1m]))", "reqps", 0, 0),
            _panel(
                2,
                "Latency p95",
                "histogram_quantile(0.95, sum by (le) "
                "(rate(ml_request_duration_seconds_bucket[5m])))",
                "s",
                12,
                0,
            ),
            _panel(3, "In flight", f"sum({IN_FLIGHT_METRIC})", "short", 0, 8),
            _panel(4, "Ready servers", "sum(ml_ready)", "short", 12, 8),
        ],
    }


def grafana_datasource() -> dict[str, Any]:
    """Provisioned Prometheus data source (fixed uid, referenced by the dashboard)."""
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "uid": PROMETHEUS_UID,
                "access": "proxy",
                "url": "http://prometheus:9090",
                "isDefault": True,
            }
        ],
    }


def grafana_dashboard_provider() -> dict[str, Any]:
    """Provisioning entry that loads dashboards from the mounted folder."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "modelkiln",
                "type": "file",
                "disableDeletion": True,
                "options": {"path": "/var/lib/grafana/dashboards"},
            }
        ],
    }
