"""Drift state for the gates, read over HTTP from ``GET /v1/monitor`` of the server that
runs the versions (the monitor's JSON contract: /work/notes/s5/monitor-json.md, in short
``models[]`` entries with ``model``, ``version``, ``drift_checked``, ``drift_detected``,
``profile.status`` and ``features[]``). Over HTTP on purpose: the rollout package never
imports the monitor package (tests/unit/test_architecture.py), and the versions may run in
another process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def drifted_features(snapshot: dict[str, Any], served: str, version: str) -> list[str] | None:
    """What ``/v1/monitor`` says about one version: the drifted features (``[]``: checked, no
    drift), or None when it has no drift information (no profile, windows not full yet,
    version not seen)."""
    entries = [
        m
        for m in snapshot.get("models") or []
        if m.get("model") == served and str(m.get("version", "")) in ("", version)
    ]
    if not entries:
        return None
    out: list[str] = []
    known = False
    for m in entries:
        if (m.get("profile") or {}).get("status") != "ok" or not m.get("drift_checked"):
            continue
        known = True
        if m.get("drift_detected"):
            names = [f"{f.get('feature')} ({f.get('test')})" for f in m.get("features") or []
                     if f.get("drifted")]  # fmt: skip
            out += names or ["drift_detected"]
    return out if known else None


class HttpDriftProbe:
    """``(model, version) -> drifted features | None``, read from ``GET {url}/v1/monitor``.

    Args:
        url: the server's base URL, or a function giving it (None while not known yet).
        served_name: ``(model, version) -> name the server serves that version under``.
        timeout_s: per request; a monitor that does not answer gives no information.
    """

    def __init__(
        self,
        url: str | Callable[[], str | None],
        served_name: Callable[[str, str], str],
        timeout_s: float = 2.0,
    ) -> None:
        self.url = url
        self.served_name = served_name
        self.timeout_s = timeout_s
        self._warned = False
        self._client: Any = None  # one pooled client: a check asks twice (both versions)

    def snapshot(self) -> dict[str, Any] | None:
        """The monitor's JSON, or None (no URL yet, no monitor, not reachable)."""
        import httpx

        base = self.url() if callable(self.url) else self.url
        if not base:
            return None
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout_s)
        try:
            r = self._client.get(base.rstrip("/") + "/v1/monitor")
            r.raise_for_status()
            data = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            if not self._warned:  # once: a server without a monitor is a normal set-up
                log.warning("no drift information from %s/v1/monitor: %s", base, exc)
                self._warned = True
            return None
        return data if isinstance(data, dict) else None

    def __call__(self, model: str, version: str) -> list[str] | None:
        """Drifted features of ``model@version`` (``[]``: none), or None (no information)."""
        snap = self.snapshot()
        if snap is None:
            return None
        return drifted_features(snap, self.served_name(model, version), version)
