"""Server processes for the serving benchmarks: a free port, start-and-wait-ready, stop, and
reading a server's ``/metrics``."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def metric_samples(url: str, timeout: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of ``url``/metrics as (name, labels, value), parsed by prometheus-client."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:  # nosec B310: loopback
        text = resp.read().decode()
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]  # fmt: skip


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    cmd: list[str], url: str, timeout: float = 180, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server; return it and the seconds from spawn to the first /ready 200.

    Its output is dropped, or appended to ``log``.
    """
    import httpx

    t0 = time.perf_counter()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd} not ready in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the server drains), then the exit code; kill after 60 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
