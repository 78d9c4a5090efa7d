"""SLO strings such as ``ttft_p95=500ms,tpot_p95=50ms`` and their verdict on a run.

A target bounds a percentile of one metric: ``ttft`` (time to first token, from
the scheduled send), ``tpot``, ``itl``, ``e2e`` (response time from the scheduled
send). Units: ``us``, ``ms``, ``s`` (a bare number is milliseconds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from modelkiln.bench.results import SLO, LoadReport, percentile, series
from modelkiln.bench.stats import bootstrap_percentile_ci
from modelkiln.errors import ConfigError

__all__ = ["SLOSpec", "Target", "parse_slo"]

#: SLO metric name -> the result series it reads.
METRICS = {"ttft": "ttft_response", "tpot": "tpot", "itl": "itl", "e2e": "response"}
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}
_TERM = re.compile(r"^(ttft|tpot|itl|e2e)_p(\d{1,2}(?:\.\d+)?)=(\d+(?:\.\d+)?)(us|ms|s)?$")
_HINT = "e.g. --slo ttft_p95=500ms,tpot_p95=50ms (metrics ttft, tpot, itl, e2e; units us, ms, s)"


@dataclass(frozen=True)
class Target:
    """``metric``'s ``q``-th percentile must be at most ``bound_s`` seconds."""

    metric: str
    q: float
    bound_s: float

    @property
    def name(self) -> str:
        """The spelling used in reports, e.g. ``ttft_p95``."""
        return f"{self.metric}_p{self.q:g}"


@dataclass(frozen=True)
class SLOSpec:
    """Every target of one SLO string."""

    targets: tuple[Target, ...]

    def per_request(self) -> SLO:
        """The per-request bounds used for goodput (a request must meet each bound)."""
        b = {t.metric: t.bound_s for t in self.targets}
        return SLO(ttft_s=b.get("ttft", float("inf")), tpot_s=b.get("tpot", float("inf")),
                   e2e_s=b.get("e2e"), itl_s=b.get("itl"))  # fmt: skip

    def evaluate(self, report: LoadReport, ci: bool = True) -> dict[str, Any]:
        """Per target: value, bound, pass, and the bootstrap 95 % interval of the value (ms)."""
        data = series(report.results)
        out: dict[str, Any] = {}
        for t in self.targets:
            values = data[METRICS[t.metric]]
            p = percentile(values, t.q)
            row: dict[str, Any] = {"bound_ms": t.bound_s * 1000,
                                   "value_ms": None if p is None else p * 1000,
                                   "ok": p is not None and p <= t.bound_s}  # fmt: skip
            interval = bootstrap_percentile_ci(values, t.q) if ci else None
            if interval is not None:
                row["ci_ms"] = [interval[0] * 1000, interval[1] * 1000]
                row["surely_ok"] = interval[1] <= t.bound_s
                row["surely_failed"] = interval[0] > t.bound_s
            out[t.name] = row
        return out

    def met(self, report: LoadReport) -> bool:
        """Whether the run met every target (point estimates; errors count as failures)."""
        if not report.results or any(not r.ok for r in report.results):
            return False
        return all(row["ok"] for row in self.evaluate(report, ci=False).values())


def parse_slo(text: str) -> SLOSpec:
    """Parse ``metric_pNN=VALUE[unit],...``.

    Raises:
        ConfigError: a term does not parse (the message names it).
    """
    targets = []
    for raw in text.split(","):
        term = raw.strip().lower()
        m = _TERM.match(term)
        if m is None:
            raise ConfigError(f"cannot parse SLO term {raw.strip()!r} in {text!r}", hint=_HINT)
        q = float(m.group(2))
        if not 0 < q < 100:
            raise ConfigError(f"SLO percentile must be in (0, 100): {raw.strip()!r}", hint=_HINT)
        targets.append(Target(m.group(1), q, float(m.group(3)) * _UNITS[m.group(4) or ""]))
    return SLOSpec(tuple(targets))
