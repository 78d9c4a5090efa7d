"""The monitor's state as Prometheus gauges, read at scrape time.

- ``ml_drift_score{model,version,feature,test}``: the last score, 1.0 at the
  calibrated threshold (above it: drift);
- ``ml_drift_detected{model,version,feature,test}``: 1 when the last check drifted;
- ``ml_drift_p_value{...}``: the last p-value (tests that have one);
- ``ml_monitor_profile{model,status}``: 1 for the profile status of each model
  (``ok``, ``missing``, ``corrupt``, ``mismatched``), so a monitor that is off
  for a model is visible and alertable;
- ``ml_monitor_checks_total``: checks run.

Example::

    registry.register(DriftCollector(monitor))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LABELS = ["model", "version", "feature", "test"]


class DriftCollector(Collector):
    """Yields the monitor's gauges from its last states."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        score = GaugeMetricFamily(
            "ml_drift_score", "Drift score; 1.0 is the calibrated threshold", labels=LABELS
        )
        detected = GaugeMetricFamily(
            "ml_drift_detected", "1 when the last drift check flagged the feature", labels=LABELS
        )
        pvalue = GaugeMetricFamily("ml_drift_p_value", "Last drift test p-value", labels=LABELS)
        for s in self.monitor.states():
            labels = [s.model, s.version, s.feature, s.test]
            score.add_metric(labels, s.score)
            detected.add_metric(labels, 1.0 if s.drifted else 0.0)
            if s.p_value is not None:
                pvalue.add_metric(labels, s.p_value)
        profile = GaugeMetricFamily(
            "ml_monitor_profile", "Reference profile status per model (1 = this status)",
            labels=["model", "status"],
        )  # fmt: skip
        for model, (status, _msg) in sorted(self.monitor.profile_status.items()):
            profile.add_metric([model, status], 1.0)
        checks = CounterMetricFamily("ml_monitor_checks", "Drift checks run")
        checks.add_metric([], float(self.monitor.checks))
        yield from (score, detected, pvalue, profile, checks)
