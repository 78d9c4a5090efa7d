"""The rollout's Prometheus metrics (appended to the server's ``/metrics``).

Names start with ``kiln_rollout_`` so they never clash with the server's ``ml_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modelkiln.rollout.analysis import TESTS

if TYPE_CHECKING:
    from modelkiln.rollout.policy import TrafficPolicy
    from modelkiln.rollout.spec import Decision

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RolloutMetrics:
    """Per-version requests and latency, the split, and every decision."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kiln_rollout_requests_total", "Requests by logical model, version and HTTP status",
            ["model_name", "version", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "kiln_rollout_request_duration_seconds", "Request latency by version",
            ["model_name", "version"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.weight = Gauge(
            "kiln_rollout_traffic_percent", "Percent of traffic a version serves",
            ["model_name", "version"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "kiln_rollout_decisions_total", "Controller decisions by action",
            ["model_name", "action"], registry=r,
        )  # fmt: skip
        self.evidence = Gauge(
            "kiln_rollout_log_evidence", "log likelihood ratio of each gate (rollback at bound)",
            ["model_name", "test"], registry=r,
        )  # fmt: skip

    def request(self, model: str, version: str, status: int, seconds: float) -> None:
        """One finished request."""
        self.requests.labels(model, version, str(status)).inc()
        self.duration.labels(model, version).observe(seconds)

    def policy(self, model: str, policy: TrafficPolicy) -> None:
        """The split now in force."""
        for version, pct in policy.weights.items():
            self.weight.labels(model, version).set(pct)

    def decision(self, d: Decision) -> None:
        """One controller decision."""
        self.decisions.labels(d.model, d.action).inc()
        for test in TESTS:
            value = d.numbers.get("log_evidence", {}).get(test)
            if value is not None:
                self.evidence.labels(d.model, test).set(value)

    def render(self) -> bytes:
        """Prometheus text format."""
        return generate_latest(self.registry)
