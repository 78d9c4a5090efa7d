"""Start each server on loopback, wait until it answers, stop it.

Every server keeps its own defaults except what the comparison needs to be fair
(the same model, 2 threads where a server does not take all cores by itself, 32
generation slots for llama-server as modelkiln's default ``max_num_seqs`` is 32).
Their output goes to ``<run dir>/<name>.log``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

KILN = Path(sys.executable).with_name("kiln")


@dataclass
class Server:
    """One server process: how to start it, where it answers, which model name it serves."""

    name: str
    cmd: list[str]
    model: str
    ready_path: str = "/v1/models"
    extra_body: dict[str, object] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    start_s: float | None = None

    @property
    def url(self) -> str:
        """Base URL on loopback."""
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kiln(name: str, model_dir: Path, served: str, log_dir: Path, sets: list[str]) -> Server:
    """``kiln serve --model-path DIR`` with its defaults (name, port, log file, and ``--set``s)."""
    port = free_port()
    cmd = [str(KILN), "serve", "--model-path", str(model_dir), "--name", served,
           "--port", str(port), "--log-level", "info",  # its own lines: refusals say why
           "--log-file", str(log_dir / f"{name}.serve.log")]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    return Server(name, cmd, served, "/ready", port=port)


def infinity(peers: Path, model_dir: Path, served: str, precision: str = "bf16") -> Server:
    """infinity-emb v2, torch engine, at ``precision`` (its defaults otherwise: batch size 32).

    The caller passes the precision modelkiln measured as the faster one on this CPU
    ("bf16" on AVX512-BF16 / AMX; anything else runs float32: on AVX2-only CPUs bf16 is
    40x slower).
    """
    name = "bf16" if precision == "bf16" else "fp32"
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[name]
    port = free_port()
    cmd = [str(peers / "infinity" / "venv" / "bin" / "infinity_emb"), "v2",
           "--model-id", str(model_dir), "--served-model-name", served,
           "--engine", "torch", "--dtype", dtype, "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1",
           "--no-model-warmup", "--log-level", "warning"]  # fmt: skip
    return Server(f"infinity-emb {name} torch", cmd, served, "/v1/models", port=port)


def llama_server(peers: Path, gguf: Path, served: str, label: str, slots: int) -> Server:
    """llama.cpp ``llama-server``: ``slots`` parallel sequences, continuous batching, 2 threads."""
    port = free_port()
    ctx = slots * 320  # 32-token prompt + 128 new tokens per slot, with room to spare
    cmd = [str(peers / "llamacpp" / "bin" / "llama-server"), "-m", str(gguf), "-t", "2",
           "-np", str(slots), "-c", str(ctx), "-cb", "--alias", served,
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return Server(label, cmd, served, "/health", {"ignore_eos": True}, port=port)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # nosec B310: loopback http only
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def start(server: Server, log_dir: Path, timeout: float = 900.0) -> Server:
    """Spawn ``server`` and wait for a 200 on its ready path (records the cold start)."""
    log = open(log_dir / f"{server.name.replace(' ', '_')}.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    server.proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env=os.environ.copy())  # fmt: skip
    while time.perf_counter() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; "
                               f"see {log.name}")  # fmt: skip
        if _get(server.url + server.ready_path) == 200:
            server.start_s = time.perf_counter() - t0
            return server
        time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"{server.name} not ready in {timeout:g} s; see {log.name}")


def stop(server: Server) -> int | None:
    """SIGTERM, then SIGKILL after 30 s; the exit code."""
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
