"""Running the server: :func:`serve` (blocking, drains on SIGTERM) and :class:`ModelServer`.

SIGTERM (or Ctrl-C) drains: ``/ready`` turns 503 and new model requests get
503 at once, uvicorn stops accepting connections and waits up to
``drain_timeout_s`` for in-flight requests, the engines finish what they
hold, and the process exits 0. A second Ctrl-C forces the exit.

Example:
    >>> serve(ServeConfig(models=[ModelSpec(path="runs/x/train/model")], port=8000))
    >>> with ModelServer("runs/x/train/model", port=0) as server:   # background thread
    ...     httpx.get(server.url + "/v1/models")
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from modelkiln.contract.serving import ServeHooks
from modelkiln.errors import ServingError
from modelkiln.logs import keep_on_terminal
from modelkiln.serve.app import create_app
from modelkiln.serve.config import (
    CacheConfig,
    EmbeddingBatchConfig,
    GenerationConfig,
    ModelSpec,
    ServeConfig,
)
from modelkiln.serve.state import ServerState

log = logging.getLogger(__name__)


def process_age() -> float:
    """Seconds since this process started (0.0 when the platform does not say).

    On Linux from ``/proc/self/stat`` (start time in clock ticks since boot) and
    the boot-time clock: ~10 ms resolution. ``psutil.Process().create_time()`` adds
    the boot time that ``/proc/stat`` rounds to whole seconds, so its age can be off
    by up to a second: too coarse for a cold start of 1-2 s. Elsewhere psutil.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        pass
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # boundary: psutil missing or the process table unreadable
        return 0.0


def process_started() -> float:
    """``time.monotonic()`` at the start of this process (for the cold-start figure)."""
    return time.monotonic() - process_age()


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.kiln_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.kiln_state.draining:
            log.info(
                "signal %s: draining (up to %.0f s)", sig, self.config.timeout_graceful_shutdown
            )
        if self.kiln_state.drain_deadline is None:
            self.kiln_state.drain_deadline = time.monotonic() + self.kiln_state.cfg.drain_timeout_s
        self.kiln_state.draining = True
        self.kiln_state.ready = False
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def quiet_signals() -> Iterator[None]:
    """Ignore SIGTERM / SIGINT's default handlers while uvicorn runs (main thread only)."""
    # uvicorn re-raises the signal it caught after shutting down; with the default
    # handlers that would turn a clean drain into "killed by SIGTERM" (exit 143).
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def build_server(
    cfg: ServeConfig,
    log_level: str,
    started: float | None,
    engines: dict[str, Any] | None = None,
    hooks: ServeHooks | None = None,
) -> tuple[_DrainingServer, list[BaseException]]:
    """The uvicorn server for ``cfg`` (not started) and the list its fatal error lands in.

    Shared by :func:`serve`, the in-process :class:`ModelServer` and each
    ``--workers`` process (:mod:`.workers`), so all three are the same server.
    """
    fatal: list[BaseException] = []
    holder: dict[str, _DrainingServer] = {}

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        holder["server"].should_exit = True

    app = create_app(cfg, engines=engines, started=started, on_fatal=on_fatal, hooks=hooks)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, int(cfg.drain_timeout_s)),
        lifespan="on",
        access_log=False,
        timeout_keep_alive=max(1, round(cfg.keep_alive_s)),  # see ServeConfig.keep_alive_s
        limit_concurrency=cfg.max_connections,
        backlog=cfg.backlog,
        # uvloop + httptools when installed (the serve extra has them): next to asyncio + h11
        # they cut the event loop's CPU per streamed token by a fifth to a third.
        loop="auto",
        http="auto",
        **(hooks.uvicorn_options if hooks is not None else {}),
    )
    server = _DrainingServer(config, app.state.kiln)
    holder["server"] = server
    return server, fatal


def serve(cfg: ServeConfig, *, log_level: str = "info", hooks: ServeHooks | None = None) -> None:
    """Serve ``cfg`` until SIGTERM / SIGINT, drain, and return.

    ``hooks``: what plug-ins add (see :class:`~modelkiln.contract.serving.ServeHooks`).

    Raises:
        ServingError: a model could not be loaded (the server stops at once).
    """
    server, fatal = build_server(cfg, log_level, process_started(), hooks=hooks)
    # uvicorn.Config made its handler from sys.stderr, which is the third-party log while
    # `python -m modelkiln.serve` captures it: uvicorn's lines are the server's own.
    keep_on_terminal("uvicorn")
    with quiet_signals():
        server.run()
    if fatal:
        raise ServingError(f"the server stopped: {fatal[0]}") from fatal[0]


class ModelServer:
    """The handbook's ``ModelServer``, over :func:`create_app` / :func:`serve`.

    Args:
        model_path: one model directory or several.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (engines use CUDA when present).
        batch_size: most sequences per encoder batch and per generation step.
        max_batch_delay_ms: longest an embedding input waits for its batch.
        cache_enabled: cache deterministic responses.
        host: interface; port: TCP port (0: a free one, see :attr:`url`).
        config: a full :class:`ServeConfig` instead of the arguments above.
        engines: prebuilt engines by served name (custom backends, tests).
        hooks: what plug-ins add (observers, authenticator, guards, routers ...).
    """

    def __init__(
        self,
        model_path: str | Path | list[str | Path] | None = None,
        device: str = "auto",
        batch_size: int = 32,
        max_batch_delay_ms: float = 50.0,
        cache_enabled: bool = True,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        config: ServeConfig | None = None,
        engines: dict[str, Any] | None = None,
        hooks: ServeHooks | None = None,
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ServingError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
        if config is None:
            if model_path is None:
                raise ServingError("ModelServer needs model_path or config")
            paths = model_path if isinstance(model_path, list) else [model_path]
            config = ServeConfig(
                models=[ModelSpec(path=Path(p)) for p in paths],
                host=host,
                port=port,
                embedding=EmbeddingBatchConfig(
                    max_batch_size=batch_size, max_wait_ms=max_batch_delay_ms
                ),
                generation=GenerationConfig(max_num_seqs=batch_size),
                cache=CacheConfig(enabled=cache_enabled),
            )
        self.config = config
        self.device = device
        self.engines = engines
        self.hooks = hooks
        self._server: _DrainingServer | None = None
        self._thread: threading.Thread | None = None
        self._fatal: list[BaseException] = []

    def create_app(self) -> Any:
        """A FastAPI app for this config (to mount or run elsewhere)."""
        return create_app(self.config, engines=self.engines, hooks=self.hooks)

    def run(self, log_level: str = "info") -> None:
        """Serve in the foreground until SIGTERM / Ctrl-C (see :func:`serve`)."""
        serve(self.config, log_level=log_level, hooks=self.hooks)

    def start(self, timeout: float = 120.0, log_level: str = "warning") -> str:
        """Serve from a background thread; return the base URL once ``/ready`` would be 200.

        Raises:
            ServingError: the server did not become ready within ``timeout`` s.
        """
        self._server, self._fatal = build_server(
            self.config, log_level, time.monotonic(), self.engines, self.hooks
        )
        self._thread = threading.Thread(target=self._server.run, name="kiln-server", daemon=True)
        self._thread.start()
        state: ServerState = self._server.kiln_state
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._fatal or not self._thread.is_alive():
                self.stop()
                raise ServingError(
                    f"the server did not start: {self._fatal[0] if self._fatal else 'exited'}"
                )
            if self._server.started and state.ready:
                return self.url
            time.sleep(0.02)
        self.stop()
        raise ServingError(f"the server was not ready within {timeout:.0f} s")

    @property
    def url(self) -> str:
        """``http://host:port`` of the running background server."""
        if self._server is None or not self._server.servers:
            raise ServingError("the server is not running", hint="call start() first")
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop the background server."""
        if self._server is None or self._thread is None:
            return
        self._server.kiln_state.draining = True
        self._server.should_exit = True
        self._thread.join(timeout if timeout is not None else self.config.drain_timeout_s + 30)
        self._server = self._thread = None

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
