"""Sample a running server with py-spy (PyPI) and write a flame graph SVG.

py-spy reads another process's memory through ptrace: containers without
``CAP_SYS_PTRACE`` (or with ``kernel.yama.ptrace_scope`` >= 2) refuse it, and the
error then says so with py-spy's own message.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from modelkiln.errors import ConfigError, DependencyMissingError, EnvironmentCheckError

_PTRACE_HINT = (
    "py-spy needs ptrace: run as the server's user with kernel.yama.ptrace_scope <= 1, "
    "or give the container CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)"
)


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
    """The process listening on ``url``'s port on this machine.

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
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return int(c.pid)
    raise ConfigError(
        f"no process on this machine is seen listening on port {port} ({url})",
        hint="profile a local server, or pass its process id with --pid",
    )


def flame_graph(pid: int, out: Path, seconds: float, rate: int = 100) -> Path:
    """``py-spy record`` ``pid`` for ``seconds``; returns the SVG path.

    Raises:
        EnvironmentCheckError: py-spy could not attach (its exact error is in the message).
    """
    out.mkdir(parents=True, exist_ok=True)
    svg = out / "flame.svg"
    cmd = [
        pyspy_binary(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "flamegraph",
        "--output",
        str(svg),
        "--nonblocking",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not svg.is_file():
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        errors = [x.strip() for x in lines if x.strip().startswith("Error")]
        detail = errors[0] if errors else f"exit code {proc.returncode}"
        raise EnvironmentCheckError(
            f"py-spy could not sample process {pid}: {detail}", hint=_PTRACE_HINT
        )
    return svg
