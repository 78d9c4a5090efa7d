"""``kiln serve --workers N``: N server processes on one port (one box, several cores' worth).

The supervisor (the process the user started) binds the port once and starts N workers,
each ``python -m modelkiln.serve`` with the same arguments, which serve on that inherited
listening socket (uvicorn's ``sockets=``; the kernel hands each new connection to
whichever worker accepts first, as gunicorn / ``uvicorn --workers`` do); a worker starts
accepting only once its models are warm. It forwards SIGTERM / SIGINT (each worker
drains) and stops every worker if one dies.

What stays consistent across workers:

* ``/metrics`` aggregates all workers: Prometheus multiprocess mode (a shared
  ``PROMETHEUS_MULTIPROC_DIR``): counters and histograms are summed, gauges get a ``pid``
  label; collectors computed on scrape (``ml_engine_*``) are the answering worker's;
* the response cache and the per-key rate limits only through Redis (``--cache-url``,
  ``--rate-limit-redis``): in-process ones would be N separate caches / N x the limit, so
  they are refused with an error that names the flag;
* admission (queue bounds) and ``/admin`` changes (adapters, reloads) are per worker.

Each worker gets ``threads = cores // N`` intra-op threads unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from modelkiln.errors import ConfigError, ServingError

#: Set in a worker's environment: the inherited listening socket's file descriptor.
WORKER_FD_ENV = "MODELKILN_WORKER_FD"
#: Set in a worker's environment: the worker count (for its thread share).
WORKERS_ENV = "MODELKILN_WORKERS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def check_shared_state(cfg: Any, args: argparse.Namespace) -> None:
    """Refuse what N workers cannot keep consistent without Redis (one clear error each)."""
    n = cfg.workers
    if cfg.cache.enabled and cfg.cache.url is None:
        raise ConfigError(
            f"--workers {n} with the in-process response cache: each worker would keep its own",
            hint="share it with --cache-url redis://HOST:6379/0, or --set cache.enabled=false",
        )
    if getattr(args, "key_store", None) and not getattr(args, "rate_limit_redis", None):
        raise ConfigError(
            f"--workers {n} with --key-store limits kept in-process: each worker would allow "
            "the full rpm/tpm, i.e. N x the limit",
            hint="share the buckets with --rate-limit-redis redis://HOST:6379/0",
        )


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket every worker inherits (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServingError(f"cannot listen on {host}:{port}: {exc}",
                           hint="pick a free --port or stop what uses it") from exc  # fmt: skip
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def supervise(cfg: Any, args: argparse.Namespace, argv: list[str], poll_s: float = 0.2) -> None:
    """Start ``cfg.workers`` workers on one socket; return when all have stopped.

    Raises:
        ConfigError: state that would diverge between workers (see :func:`check_shared_state`).
        ServingError: the port is taken, or a worker exited on its own.
    """
    check_shared_state(cfg, args)
    sock = bind(cfg.host, cfg.port, cfg.backlog)
    metrics_dir = tempfile.mkdtemp(prefix="kiln-metrics-")
    env = {**os.environ, WORKER_FD_ENV: str(sock.fileno()), WORKERS_ENV: str(cfg.workers),
           MULTIPROC_ENV: metrics_dir}  # fmt: skip
    cmd = [sys.executable, "-m", "modelkiln.serve", *argv]
    print(f"serving on {cfg.host}:{sock.getsockname()[1]} with {cfg.workers} workers", flush=True)
    # Own sessions: a terminal's Ctrl-C reaches only this process, which forwards one SIGTERM
    # (a worker that got SIGINT too would take the second signal as "exit now, no drain").
    procs = [subprocess.Popen(cmd, pass_fds=[sock.fileno()], env=env, start_new_session=True)
             for _ in range(cfg.workers)]  # fmt: skip
    sock.close()  # the workers hold it now
    stopping: list[int] = []

    def forward(sig: int, _frame: Any) -> None:
        stopping.append(sig)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed = _wait(procs, stopping, poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if failed is not None:
        raise ServingError(f"worker pid {failed[0]} exited with code {failed[1]}; all stopped",
                           hint="see the worker's error above")  # fmt: skip


def _wait(procs: list[subprocess.Popen[bytes]], stopping: list[int],
          poll_s: float) -> tuple[int, int] | None:  # fmt: skip
    """Until every worker exited; a worker that exits before a signal stops the others."""
    failed: tuple[int, int] | None = None
    while any(p.poll() is None for p in procs):
        for proc in procs:
            code = proc.poll()
            if code is not None and not stopping and failed is None:
                failed = (proc.pid, code)
                for other in procs:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        time.sleep(poll_s)
    return failed


def worker_socket() -> socket.socket | None:
    """This worker's inherited listening socket, or None outside a worker."""
    fd = os.environ.get(WORKER_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None  # family and type read from the fd


def worker_config(cfg: Any) -> Any:
    """``cfg`` with this worker's share of the cores as threads (unless --threads was given)."""
    if cfg.threads is not None:
        return cfg
    share = max(1, (os.cpu_count() or 1) // int(os.environ.get(WORKERS_ENV, "1")))
    return cfg.model_copy(update={"threads": share})


def aggregated_render(registry: Any) -> Callable[[], bytes]:
    """``/metrics`` of every worker: the multiprocess files, plus this worker's on-scrape
    collectors (whose families the files do not hold)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    class _Live:
        def __init__(self, shared: list[Any]) -> None:
            self.names = {family.name for family in shared}

        def collect(self) -> Iterator[Any]:
            for family in registry.collect():
                if family.name not in self.names:
                    yield family

    def render() -> bytes:
        shared = list(MultiProcessCollector(None).collect())
        out = CollectorRegistry(auto_describe=False)
        out.register(_Static(shared))
        out.register(_Live(shared))
        return bytes(generate_latest(out))

    return render


class _Static:
    """A collector yielding already-collected families."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


class _WarmBeforeAccepting:
    """Holds the app's lifespan ``startup.complete`` until its models are warm (or failed).

    uvicorn starts accepting on the shared socket only after the lifespan started, so a
    worker still loading takes no connection from the ready ones (a single server instead
    answers 503 "loading" while it warms: there every client sees the same state).
    """

    def __init__(self, app: Any, state: Any, poll_s: float = 0.05) -> None:
        self.app, self.state, self.poll_s = app, state, poll_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def held(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                import asyncio

                state = self.state  # a signal while loading (draining) ends the wait too
                while not (state.ready or state.draining or state.load_error is not None):
                    await asyncio.sleep(self.poll_s)
            await send(message)  # a failed load: the server's own fatal path stops it

        await self.app(scope, receive, held)


def serve_worker(cfg: Any, sock: socket.socket, *, log_level: str, hooks: Any) -> None:
    """One worker: the server of :func:`modelkiln.serve.server.serve` on ``sock``."""
    # The server module's own build and signal handling, so a worker is exactly the
    # single-process server apart from the socket and the metrics it renders.
    from modelkiln.logs import keep_on_terminal
    from modelkiln.serve.server import build_server, process_started, quiet_signals

    server, fatal = build_server(worker_config(cfg), log_level, process_started(), hooks=hooks)
    state = server.kiln_state
    # One instance's render, swapped: the metrics module stays the single-process one.
    state.metrics.render = aggregated_render(state.metrics.registry)  # type: ignore[method-assign]
    server.config.app = _WarmBeforeAccepting(server.config.app, state)
    keep_on_terminal("uvicorn")
    with quiet_signals():
        server.run(sockets=[sock])
    if fatal:
        raise ServingError(f"the server stopped: {fatal[0]}") from fatal[0]
