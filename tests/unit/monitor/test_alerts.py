"""Alert rules: dedup, grouping, for-duration, cooldown, resolved notices, bad rule files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelkiln.errors import ConfigError
from modelkiln.monitor.alerts import AlertManager, AlertsConfig, check_rules
from modelkiln.monitor.channels import ChannelConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def snap(drift: dict[str, bool], p95: float = 0.1) -> dict[str, Any]:
    feats = [{"feature": f, "test": "ks", "drifted": d} for f, d in drift.items()]
    return {"models": [{"model": "lm", "version": "1", "requests": 10, "features": feats,
                        "latency_p95_s": p95}]}  # fmt: skip


def manager(tmp_path: Path, **kw: Any) -> tuple[AlertManager, list[tuple[str, str]], Clock]:
    sent: list[tuple[str, str]] = []
    clock = Clock()
    cfg = AlertsConfig.model_validate({
        "channels": [{"name": "a", "type": "webhook", "url": "http://x"},
                     {"name": "b", "type": "slack", "url": "http://y"}],
        "rules": [{"name": "drift", "kind": "drift", "channels": ["a", "b"]},
                  {"name": "slow", "kind": "metric", "metric": "latency_p95_s", "value": 0.5,
                   "for_s": 30, "severity": "critical", "channels": ["a"]}],
        "log": str(tmp_path / "alerts.jsonl"), **kw,
    })  # fmt: skip
    m = AlertManager(cfg, clock=clock, sender=lambda ch, al: sent.append((ch.name, al["status"])))
    return m, sent, clock


def wait_sent(m: AlertManager) -> None:
    import time

    for _ in range(200):
        if m.dispatcher.pending() == 0:
            return
        time.sleep(0.01)


def test_drift_fires_once_per_group_then_resolves(tmp_path: Path) -> None:
    m, sent, clock = manager(tmp_path)
    assert m.evaluate(snap({"x": False, "y": False})) == []
    ev = m.evaluate(snap({"x": True, "y": True}))  # two features, one group: one alert
    assert [e["status"] for e in ev] == ["firing"] and "x (ks), y (ks)" in ev[0]["summary"]
    clock.t += 10
    assert m.evaluate(snap({"x": True, "y": False})) == []  # dedup while it holds
    ev = m.evaluate(snap({"x": False, "y": False}))
    assert [e["status"] for e in ev] == ["resolved"]
    wait_sent(m)
    m.close()
    assert sorted(sent) == [("a", "firing"), ("a", "resolved"), ("b", "firing"), ("b", "resolved")]
    log = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log if not e["event"].startswith("delivery")] == [
        "firing", "resolved"]  # fmt: skip
    assert sum(e["event"] == "delivery_delivered" for e in log) == 4


def test_cooldown_suppresses_a_refire(tmp_path: Path) -> None:
    m, _, clock = manager(tmp_path, cooldown_s=300)
    m.evaluate(snap({"x": True}))
    m.evaluate(snap({"x": False}))
    clock.t += 100
    assert m.evaluate(snap({"x": True})) == []
    clock.t += 300
    assert [e["status"] for e in m.evaluate(snap({"x": True}))] == ["firing"]
    m.close()


def test_metric_rule_waits_for_its_duration(tmp_path: Path) -> None:
    m, _, clock = manager(tmp_path)
    assert m.evaluate(snap({}, p95=0.9)) == []
    clock.t += 29
    assert m.evaluate(snap({}, p95=0.9)) == []
    clock.t += 2
    ev = m.evaluate(snap({}, p95=0.9))
    assert [(e["rule"], e["severity"]) for e in ev] == [("slow", "critical")]
    m.close()


def test_failing_channel_is_retried_with_backoff_then_given_up(tmp_path: Path) -> None:
    calls: list[str] = []

    def broken(ch: ChannelConfig, alert: dict[str, Any]) -> None:
        calls.append(ch.name)
        raise ConnectionError("refused")

    cfg = AlertsConfig.model_validate({
        "channels": [{"name": "a", "type": "webhook", "url": "http://x"}],
        "rules": [{"name": "drift", "kind": "drift"}], "retry_attempts": 3,
        "retry_backoff_s": 0.01, "log": str(tmp_path / "a.jsonl"),
    })  # fmt: skip
    m = AlertManager(cfg, sender=broken)
    m.evaluate(snap({"x": True}))  # returns at once: delivery is on the dispatcher thread
    wait_sent(m)
    m.close()
    assert calls == ["a", "a", "a"]
    events = [json.loads(x)["event"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert events == ["firing", "delivery_failed", "delivery_failed", "delivery_gave_up"]


def test_rule_file_errors_name_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("rules:\n  - {name: d, kind: drift, test: kss}\n")
    with pytest.raises(ConfigError, match="unknown drift test 'kss'"):
        check_rules(f)
    f.write_text("rules:\n  - {name: d, kind: drift, channels: [nope]}\n")
    with pytest.raises(ConfigError, match="unknown channel"):
        check_rules(f)
    f.write_text("rules:\n  - {name: m, kind: metric, metric: p95}\n")
    with pytest.raises(ConfigError, match="needs metric in"):
        check_rules(f)
