"""Sample a running server with py-spy (PyPI) and write a flame graph SVG.

py-spy reads another process's memory through ptrace: containers without
``CAP_SYS_PTRACE`` (or with ``kernel.yama.ptrace_scope`` >= 2) refuse it, and the
error then says so with py-spy's own message.

py-spy's "Failed to find python version from target process" means the process
is not a Python interpreter: a shell wrapper (``bash -c 'python -m ...'``, the
``$!`` of a backgrounded pipeline), a container's port forwarder (podman's
``rootlessport``, docker-proxy) or a supervisor in another language. So the
target is checked first: a Python process is sampled with its Python children
(``--subprocesses``: every worker of a multi-process server); a non-Python one
is sampled through its Python descendants, and one with none is refused with
its name, so the error says which process it was instead of blaming ptrace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelkiln.errors import ConfigError, DependencyMissingError, EnvironmentCheckError

_PTRACE_HINT = (
    "py-spy needs ptrace: run as the server's user with kernel.yama.ptrace_scope <= 1, "
    "or give the container CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)"
)
_NOT_PYTHON_HINT = (
    "pass --pid of the Python process that runs the server (e.g. `pgrep -f modelkiln.serve`); "
    "for a server in a container, run kiln profile inside the container"
)
_PYTHON_NAME = re.compile(r"^python\d*(\.\d+)*[dmu]?$")


def pyspy_binary() -> str:
    """The py-spy executable (next to this interpreter first).

    Raises:
        DependencyMissingError: py-spy is not installed.
    """
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.is_file() else shutil.which("py-spy")
    if found is None:
        raise DependencyMissingError("py-spy", "bench", purpose="kiln profile --server")
    return found


def server_pid(url: str) -> int:
    """The process listening on ``url``'s port on this machine (a Python one first).

    Workers sharing the port under one Python supervisor give the supervisor, so
    ``--subprocesses`` samples every worker (see :func:`_supervisor`).

    Raises:
        ConfigError: no local process listens there (pass ``--pid``).
    """
    import psutil

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {url!r}", hint="e.g. http://127.0.0.1:8000")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        conns = []
    pids = sorted(
        {int(c.pid) for c in conns
         if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    )  # fmt: skip
    if not pids:
        raise ConfigError(
            f"no process on this machine is seen listening on port {port} ({url})",
            hint="profile a local server, or pass its process id with --pid",
        )
    python = [p for p in pids if _is_python(p)]
    # Several listeners (a forwarder in front, unrelated workers): a Python one first.
    chosen = python[0] if python else pids[0]
    return _supervisor(chosen, port) or chosen


def _supervisor(pid: int, port: int) -> int | None:
    """The Python parent of ``pid`` when two or more of its children listen on ``port``.

    Workers sharing one socket (``kiln serve --workers``, gunicorn) show up as a single
    listener in the system-wide table; their supervisor is what covers them all.
    """
    import psutil

    try:
        parent = psutil.Process(pid).parent()
        if parent is None or not _is_python(parent.pid):
            return None
        listening = 0
        for child in parent.children():
            conns = child.net_connections(kind="tcp")
            listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                             for c in conns)  # fmt: skip
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return parent.pid if listening >= 2 else None


def _is_python(pid: int) -> bool:
    """Whether ``pid`` runs a CPython interpreter (its executable is named python*)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        names = [proc.name(), Path(proc.exe()).name]
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False
    return any(_PYTHON_NAME.match(n) for n in names if n)


def _describe(pid: int) -> str:
    import psutil

    try:
        proc = psutil.Process(pid)
        return f"'{proc.name()}' ({' '.join(proc.cmdline())[:120]})"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "(gone or not readable)"


def python_targets(pid: int) -> list[int]:
    """The Python processes py-spy will sample for ``pid``: itself, and its Python descendants.

    Raises:
        ConfigError: no process ``pid``.
        EnvironmentCheckError: neither ``pid`` nor any descendant runs Python.
    """
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        raise ConfigError(f"no process with id {pid}", hint="check the --pid value") from None
    found = [p for p in [pid, *(c.pid for c in children)] if _is_python(p)]
    if not found:
        raise EnvironmentCheckError(
            f"process {pid} is {_describe(pid)}, not a Python interpreter, and has no Python "
            "child: py-spy can only sample Python",
            hint=_NOT_PYTHON_HINT,
        )
    return found


def _pyspy_error(
    pid: int, proc: subprocess.CompletedProcess[str], seconds: float
) -> EnvironmentCheckError:
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    errors = [x.strip() for x in lines if x.strip().startswith("Error")]
    detail = errors[0] if errors else f"exit code {proc.returncode}"
    if "No stack counts found" in detail:  # attached fine; every thread was waiting
        return EnvironmentCheckError(
            f"py-spy sampled process {pid} for {seconds:g} s but no Python code ran there: "
            "the server was idle (py-spy leaves out threads that wait)",
            hint="profile while the server is under load (e.g. `kiln bench serve --url ...` "
            "in another shell), or pass --idle to include waiting threads",
        )
    if "python version" in detail:  # py-spy found no interpreter in that process
        return EnvironmentCheckError(
            f"py-spy could not sample process {pid} {_describe(pid)}: {detail}",
            hint=_NOT_PYTHON_HINT,
        )
    return EnvironmentCheckError(
        f"py-spy could not sample process {pid}: {detail}", hint=_PTRACE_HINT
    )


def flame_graph(
    pid: int, out: Path, seconds: float, rate: int = 100, *, idle: bool = False
) -> Path:
    """``py-spy record`` ``pid`` and its Python children for ``seconds``; returns the SVG path.

    ``idle`` also samples threads that wait (py-spy's ``--idle``): an idle server then
    shows where it waits instead of failing with "no Python code ran".

    Writes ``out/flame.json`` beside the SVG: which processes were sampled.

    Raises:
        EnvironmentCheckError: no Python to sample there, or py-spy could not attach
            (its exact error is in the message).
    """
    import json

    targets = python_targets(pid)
    out.mkdir(parents=True, exist_ok=True)
    svg = out / "flame.svg"
    cmd = [
        pyspy_binary(), "record", "--pid", str(pid), "--subprocesses",
        "--duration", str(max(1, round(seconds))), "--rate", str(rate),
        "--format", "flamegraph", "--output", str(svg), "--nonblocking",
        *(["--idle"] if idle else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not svg.is_file():
        raise _pyspy_error(pid, proc, seconds)
    info: dict[str, Any] = {
        "pid": pid,
        "process": _describe(pid),
        "python_pids": targets,
        "seconds": seconds,
        "rate_hz": rate,
        "idle_threads": idle,
        "samples": _samples(proc.stdout + proc.stderr),
    }
    (out / "flame.json").write_text(json.dumps(info, indent=2) + "\n")
    return svg


def _samples(text: str) -> int | None:
    m = re.search(r"Samples: (\d+)", text)
    return int(m.group(1)) if m else None
