"""The server side of the plug-in contract (:mod:`modelkiln.contract.serving`).

- :class:`ObserverHub` hands each finished request's :class:`RequestRecord` to
  the observers on one background thread: the request path only appends to a
  bounded queue.
- Routes describe their request with :func:`note` (tokens, outputs, cache
  hit) in the ASGI scope's state; :class:`RequestMiddleware` adds status and
  latency when the last body byte has gone out (a stream's end), emits the
  record, adds the headers the request guards returned, and keeps the
  request metrics (one wrapper times each request once).

Example:
    >>> hub = ObserverHub([collector]); hub.emit(record); hub.flush(5.0)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelkiln.contract.serving import RequestObserver, RequestRecord
from modelkiln.serve.metrics import MODEL_ROUTES, ServeMetrics

log = logging.getLogger(__name__)

#: Routes whose requests are recorded (model routes and the admin API).
RECORDED_PREFIXES = ("/v1/", "/inference", "/admin/")
#: Scope-state keys the routes fill in.
NOTE_KEY = "kiln_note"
HEADERS_KEY = "kiln_headers"


class ObserverHub:
    """Calls every observer with every record, off the request path.

    Args:
        observers: the observers (none: :meth:`emit` is never called).
        max_pending: records held while the observers lag; beyond it they are dropped.
    """

    def __init__(
        self, observers: Iterable[RequestObserver] = (), max_pending: int = 10_000
    ) -> None:
        self.observers = list(observers)
        self.max_pending = max_pending
        self.dropped = 0
        self.failed = 0
        self._pending: collections.deque[RequestRecord] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True when at least one observer listens."""
        return bool(self.observers)

    def emit(self, record: RequestRecord) -> None:
        """Queue ``record`` for the observers (never blocks; drops when the queue is full)."""
        with self._cond:
            if self._closed:
                return
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending.append(record)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="kiln-observers", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record was observed (True) or ``timeout`` s pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Observe what is queued (up to ``timeout`` s), stop the thread, close the observers."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for observer in self.observers:
            close = getattr(observer, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # boundary: a plug-in failing to close must not block shutdown
                    log.exception("observer %r did not close cleanly", observer)

    def collect(self) -> Iterator[Any]:
        """Prometheus collector: records dropped (queue full) and observer failures."""
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(
            "ml_observer_dropped", "Request records dropped: the observers lagged", self.dropped
        )
        yield CounterMetricFamily(
            "ml_observer_errors", "Request records an observer raised on", self.failed
        )

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._busy = True
            try:
                for record in batch:
                    self._deliver(record)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer.observe(record)
            except Exception:  # boundary: a plug-in's bug never reaches a client
                self.failed += 1
                log.exception("observer %r failed on %s", observer, record.route)


def note(scope_or_request: Any, **fields: Any) -> None:
    """Add fields of the :class:`RequestRecord` of this request (later calls win).

    Accepts a starlette ``Request`` or its ASGI scope.
    """
    scope = getattr(scope_or_request, "scope", scope_or_request)
    scope.setdefault("state", {}).setdefault(NOTE_KEY, {}).update(fields)


def add_headers(scope_or_request: Any, headers: dict[str, str]) -> None:
    """Headers to add to this request's response (from the request guards)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    scope.setdefault("state", {}).setdefault(HEADERS_KEY, {}).update(headers)


def _record(scope: Scope, status: int, started: float) -> RequestRecord:
    state: dict[str, Any] = scope.get("state", {})
    fields = dict(state.get(NOTE_KEY, {}))
    run = fields.pop("run", None)  # a generation run: read its counts now, at the end
    if run is not None:
        fields.setdefault("input_tokens", run.prompt_tokens)
        fields.setdefault("output_tokens", run.completion_tokens)
        fields.setdefault("outputs", run.outputs())
    name, version = state.get("model", ("", ""))
    principal = state.get("principal")
    return RequestRecord(
        route=scope.get("path", ""),
        method=scope.get("method", ""),
        status=status,
        latency_s=time.perf_counter() - started,
        time=time.time(),
        model=name,
        version=version,
        principal=getattr(principal, "subject", None),
        **fields,
    )


class RequestMiddleware:
    """Times each model / admin request once, for the metrics and the observers.

    One ASGI wrapper (it was two, each timing the request and capturing its status,
    on the hot path): counts every model request by status in ``ml_requests_total``
    (even on errors; requests that never named a model, 401 or 404, under model "")
    and observes the successful ones' latency; emits a :class:`RequestRecord` per
    finished model / admin request when observers listen; adds the request guards'
    headers to the response.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, hub: ObserverHub) -> None:
        self.app = app
        self.metrics = metrics
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        counted = path in MODEL_ROUTES
        listed = path.startswith(RECORDED_PREFIXES)  # records and the guards' headers
        if not counted and not listed:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                extra = state.get(HEADERS_KEY)
                if extra:
                    headers = list(message.get("headers", []))
                    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in extra.items()]  # fmt: skip
                    message = {**message, "headers": headers}
            await send(message)

        metrics = self.metrics
        if counted:
            metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if counted:
                metrics.in_flight.dec()
                name, version = state.get("model", ("", ""))
                metrics.requests.labels(name, version, str(status)).inc()
                if status < 400:
                    metrics.duration.labels(name, version).observe(time.perf_counter() - started)
            if listed and self.hub.active:
                try:
                    self.hub.emit(_record(scope, status, started))
                except Exception:  # boundary: a malformed note must not fail the request
                    log.exception("cannot build the request record of %s", path)
