"""Alert rules over the monitor's state, with dedup, grouping, cooldown and resolved notices.

Rules YAML (``kiln serve --alert-rules alerts.yaml``)::

    channels:
      - {name: hook, type: webhook, url: "http://127.0.0.1:9000/alerts"}
      - {name: chat, type: slack, url: "https://hooks.slack.com/services/..."}
      - {name: mail, type: email, host: 127.0.0.1, port: 8025, to: [ops@example.com]}
    rules:
      - {name: input-drift, kind: drift, feature: "*", severity: warning, channels: [hook, mail]}
      - {name: slow, kind: metric, metric: latency_p95_s, op: ">", value: 0.5, for_s: 60,
         severity: critical, channels: [chat]}
      - {name: low-confidence, kind: drift, feature: mean_logprob, test: confidence_drop}
    cooldown_s: 300
    log: alerts.jsonl

A ``drift`` rule holds for a (model, version) when any matching feature's last
check drifted; ``metric`` rules compare a service statistic (``latency_p95_s``,
``error_rate``, ``request_rate_per_s`` ...) with ``value``. An alert is one per
group (rule, model, version): it fires once the condition held ``for_s``
seconds, is not re-sent while it holds (dedup), sends a ``resolved`` notice
when it stops holding, and cannot fire again within ``cooldown_s`` of its last
firing. Every event (and every delivery outcome) is a line of the JSONL log.
"""

from __future__ import annotations

import fnmatch
import json
import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelkiln.errors import ConfigError
from modelkiln.monitor.channels import ChannelConfig, Dispatcher, send
from modelkiln.monitor.stattests import get_stattest

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}  # fmt: skip
METRICS = ("latency_p50_s", "latency_p95_s", "latency_p99_s", "error_rate", "request_rate_per_s")


class RuleConfig(BaseModel):
    """One alert rule."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="rule name, in every notification")
    kind: Literal["drift", "metric"] = Field(description="drift or metric condition")
    feature: str = Field("*", description="drift: feature name or glob")
    test: str | None = Field(None, description="drift: only states of this test")
    metric: str | None = Field(None, description=f"metric: one of {', '.join(METRICS)}")
    op: Literal[">", ">=", "<", "<="] = Field(">", description="metric: comparison")
    value: float = Field(0.0, description="metric: threshold")
    model: str = Field("*", description="model name or glob")
    for_s: float = Field(0.0, ge=0, description="condition must hold this long")
    severity: Literal["info", "warning", "critical"] = Field("warning", description="severity")
    channels: list[str] = Field(default_factory=list, description="channel names (empty: all)")

    @model_validator(mode="after")
    def _check(self) -> RuleConfig:
        if self.test is not None:
            try:
                get_stattest(self.test)
            except ConfigError as e:  # a ValueError, so the error names the rule's field
                raise ValueError(str(e)) from None
        if self.kind == "metric" and self.metric not in METRICS:
            raise ValueError(f"metric rule '{self.name}' needs metric in {', '.join(METRICS)}")
        return self


class AlertsConfig(BaseModel):
    """The whole rules file."""

    model_config = ConfigDict(extra="forbid")
    channels: list[ChannelConfig] = Field(default_factory=list, description="destinations")
    rules: list[RuleConfig] = Field(description="alert rules")
    cooldown_s: float = Field(300.0, ge=0, description="no re-fire of a group within this")
    log: Path | None = Field(None, description="JSONL file of every alert event")
    retry_attempts: int = Field(5, ge=1, description="delivery attempts per channel")
    retry_backoff_s: float = Field(1.0, gt=0, description="first retry delay, doubling")

    @model_validator(mode="after")
    def _channels_known(self) -> AlertsConfig:
        names = {c.name for c in self.channels}
        for r in self.rules:
            unknown = set(r.channels) - names
            if unknown:
                raise ValueError(f"rule '{r.name}' names unknown channel(s) {sorted(unknown)}")
        return self


class _Group:
    __slots__ = ("firing", "last_fired", "since", "summary")

    def __init__(self) -> None:
        self.since: float | None = None
        self.firing = False
        self.last_fired = -float("inf")
        self.summary = ""


class AlertManager:
    """Evaluates rules on the monitor's thread and hands notifications to a dispatcher."""

    def __init__(
        self,
        config: AlertsConfig,
        *,
        clock: Callable[[], float] = time.time,
        sender: Callable[[ChannelConfig, dict[str, Any]], None] = send,
    ) -> None:
        self.config = config
        self.clock = clock
        self._groups: dict[tuple[str, str, str], _Group] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=100)
        self._log_lock = threading.Lock()
        self.dispatcher = Dispatcher(
            {c.name: c for c in config.channels}, attempts=config.retry_attempts,
            backoff_s=config.retry_backoff_s, on_result=self._delivery, sender=sender,
        )  # fmt: skip
        self._monitor: Any = None

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs: Any) -> AlertManager:
        """Read a rules file; ConfigError on any bad field (an unknown test name included)."""
        from modelkiln.configbase import load_section

        cfg = load_section(AlertsConfig, Path(path), label="alert rules")
        return cls(cfg, **kwargs)

    def attach(self, monitor: Any) -> None:
        """Evaluate after every check of ``monitor`` and on its ticks."""
        self._monitor = monitor
        monitor.add_listener(lambda _states: self.evaluate())
        if hasattr(monitor, "add_tick"):
            monitor.add_tick(self.evaluate)

    def evaluate(self, snapshot: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run every rule on ``snapshot`` (default: the attached monitor's); return events."""
        snap = snapshot if snapshot is not None else self._monitor.snapshot()
        now = self.clock()
        events = []
        for rule in self.config.rules:
            for m in snap.get("models", []):
                if not fnmatch.fnmatchcase(m["model"], rule.model) or "requests" not in m:
                    continue
                holds, summary, details = self._condition(rule, m)
                ev = self._step(rule, m, holds, summary, details, now)
                if ev is not None:
                    events.append(ev)
        return events

    def _condition(self, rule: RuleConfig, m: dict[str, Any]) -> tuple[bool, str, list[Any]]:
        where = f"{m['model']} v{m['version']}"
        if rule.kind == "drift":
            hits = [f for f in m.get("features", []) if f["drifted"]
                    and fnmatch.fnmatchcase(f["feature"], rule.feature)
                    and (rule.test is None or f["test"] == rule.test)]  # fmt: skip
            names = ", ".join(f"{f['feature']} ({f['test']})" for f in hits)
            return bool(hits), f"{rule.name}: drift on {where}: {names}", hits
        value = m.get(str(rule.metric))
        holds = value is not None and _OPS[rule.op](float(value), rule.value)
        summary = f"{rule.name}: {rule.metric} = {value} {rule.op} {rule.value} on {where}"
        return holds, summary, [{"metric": rule.metric, "value": value}]

    def _step(
        self, rule: RuleConfig, m: dict[str, Any], holds: bool, summary: str,
        details: list[Any], now: float,
    ) -> dict[str, Any] | None:  # fmt: skip
        key = (rule.name, m["model"], m["version"])
        g = self._groups.setdefault(key, _Group())
        if not holds:
            g.since = None
            if g.firing:
                g.firing = False
                return self._emit("resolved", rule, m, f"resolved: {g.summary}", [], now)
            return None
        if g.since is None:
            g.since = now
        if g.firing or now - g.since < rule.for_s:
            return None  # dedup: one notification per firing
        if now - g.last_fired < self.config.cooldown_s:
            return None
        g.firing, g.last_fired, g.summary = True, now, summary
        return self._emit("firing", rule, m, summary, details, now)

    def _emit(
        self, status: str, rule: RuleConfig, m: dict[str, Any], summary: str,
        details: list[Any], now: float,
    ) -> dict[str, Any]:  # fmt: skip
        alert = {
            "status": status, "rule": rule.name, "severity": rule.severity,
            "model": m["model"], "version": m["version"], "summary": summary,
            "time": now, "details": details,
        }  # fmt: skip
        self._recent.append(alert)
        self._log({"event": status, **alert})
        for name in rule.channels or [c.name for c in self.config.channels]:
            self.dispatcher.submit(name, alert)
        return alert

    def _delivery(self, channel: str, alert: dict[str, Any], outcome: str, err: str) -> None:
        self._log({"event": f"delivery_{outcome}", "channel": channel, "rule": alert["rule"],
                   "status": alert["status"], "error": err, "time": self.clock()})  # fmt: skip

    def _log(self, entry: dict[str, Any]) -> None:
        if self.config.log is None:
            return
        line = json.dumps(entry, default=str) + "\n"
        with self._log_lock:
            self.config.log.parent.mkdir(parents=True, exist_ok=True)
            with self.config.log.open("a") as f:
                f.write(line)

    def recent(self) -> list[dict[str, Any]]:
        """The last alerts (firing and resolved), oldest first."""
        return list(self._recent)

    def close(self) -> None:
        """Stop the delivery thread."""
        self.dispatcher.close()


def check_rules(path: str | Path) -> AlertsConfig:
    """Validate a rules file without starting anything.

    Raises:
        ConfigError: the file is invalid (the message names the field).
    """
    from modelkiln.configbase import load_section

    return load_section(AlertsConfig, Path(path), label="alert rules")
