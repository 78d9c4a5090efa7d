"""Where alerts go: a generic JSON webhook, a Slack-compatible webhook, SMTP email.

Each channel sends one notification synchronously and raises on failure; the
:class:`Dispatcher` runs them on its own thread and retries a failing channel
with exponential backoff, so neither a slow nor a dead receiver ever blocks
the server or the other channels.
"""

from __future__ import annotations

import heapq
import logging
import os
import smtplib
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("modelkiln.monitor")


class ChannelConfig(BaseModel):
    """One destination of alerts."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="referenced by rules' channels")
    type: Literal["webhook", "slack", "email"] = Field(description="webhook, slack or email")
    url: str | None = Field(None, description="webhook / slack: the URL to POST to")
    host: str = Field("127.0.0.1", description="email: SMTP host")
    port: int = Field(25, description="email: SMTP port")
    sender: str = Field("modelkiln@localhost", description="email: From address")
    to: list[str] = Field(default_factory=list, description="email: recipients")
    starttls: bool = Field(False, description="email: STARTTLS before sending")
    username: str | None = Field(None, description="email: SMTP login user")
    password_env: str | None = Field(None, description="email: env var holding the password")
    timeout_s: float = Field(5.0, gt=0, description="network timeout of one attempt")


def send(channel: ChannelConfig, alert: dict[str, Any]) -> None:
    """Deliver ``alert`` to ``channel`` once (raises on any failure)."""
    if channel.type == "email":
        _email(channel, alert)
        return
    import httpx

    if channel.type == "slack":
        icon = ":white_check_mark:" if alert["status"] == "resolved" else ":rotating_light:"
        body: dict[str, Any] = {"text": f"{icon} {alert['summary']}"}
    else:
        body = alert
    r = httpx.post(str(channel.url), json=body, timeout=channel.timeout_s)
    r.raise_for_status()


def _email(channel: ChannelConfig, alert: dict[str, Any]) -> None:
    msg = EmailMessage()
    msg["Subject"] = f"[{alert['severity']}] [{alert['status']}] {alert['summary']}"
    msg["From"] = channel.sender
    msg["To"] = ", ".join(channel.to)
    lines = [f"{k}: {v}" for k, v in alert.items() if k != "details"]
    lines += ["", "details:"] + [str(d) for d in alert.get("details", [])]
    msg.set_content("\n".join(lines))
    with smtplib.SMTP(channel.host, channel.port, timeout=channel.timeout_s) as smtp:
        if channel.starttls:
            smtp.starttls()
        if channel.username:
            smtp.login(channel.username, os.environ.get(channel.password_env or "", ""))
        smtp.send_message(msg)


class Dispatcher:
    """A background thread delivering notifications, retrying failures with backoff."""

    def __init__(
        self,
        channels: dict[str, ChannelConfig],
        *,
        attempts: int = 5,
        backoff_s: float = 1.0,
        on_result: Callable[[str, dict[str, Any], str, str], None] | None = None,
        sender: Callable[[ChannelConfig, dict[str, Any]], None] = send,
    ) -> None:
        self.channels = channels
        self.attempts, self.backoff_s = attempts, backoff_s
        self.on_result = on_result  # (channel, alert, "delivered" | "failed" | "gave_up", error)
        self._send = sender
        self._heap: list[tuple[float, int, int, str, dict[str, Any]]] = []
        self._seq = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kiln-alerts", daemon=True)
        self._thread.start()

    def submit(self, channel: str, alert: dict[str, Any]) -> None:
        """Queue ``alert`` for ``channel`` (returns at once)."""
        self._push(time.monotonic(), 0, channel, alert)

    def _push(self, when: float, attempt: int, channel: str, alert: dict[str, Any]) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, attempt, channel, alert))
            self._cv.notify()

    def pending(self) -> int:
        """Notifications not delivered yet (queued or waiting for a retry)."""
        with self._cv:
            return len(self._heap)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (undelivered notifications are dropped)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(wait)
                if self._stop:
                    return
                _, _, attempt, name, alert = heapq.heappop(self._heap)
            self._deliver(attempt, name, alert)

    def _deliver(self, attempt: int, name: str, alert: dict[str, Any]) -> None:
        try:
            self._send(self.channels[name], alert)
        except Exception as e:  # any failure of a receiver: retry later
            err = f"{type(e).__name__}: {e}"
            if attempt + 1 >= self.attempts:
                log.warning("alert channel '%s' gave up after %d attempts: %s", name,
                            attempt + 1, err)  # fmt: skip
                self._report(name, alert, "gave_up", err)
                return
            self._report(name, alert, "failed", err)
            self._push(time.monotonic() + self.backoff_s * 2**attempt, attempt + 1, name, alert)
            return
        self._report(name, alert, "delivered", "")

    def _report(self, name: str, alert: dict[str, Any], outcome: str, err: str) -> None:
        if self.on_result is not None:
            try:
                self.on_result(name, alert, outcome, err)
            except Exception:
                log.exception("alert log failed")
