"""``kiln profile --server URL``: py-spy samples a real ``python -m modelkiln.serve`` on
loopback under load and writes a flame graph that holds the server's own frames.

py-spy attaches with ptrace; where the sandbox refuses it (no ``CAP_SYS_PTRACE``,
``kernel.yama.ptrace_scope`` >= 2) the test skips with py-spy's exact refusal,
measured on a throwaway Python child first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_support import free_port, start_process, stop_process
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "serve"))
from http_helpers import tiny_encoder_dir

from modelkiln.cli import app


def ptrace_refusal() -> str | None:
    """py-spy's error on a plain Python child of ours, or None when it can sample here."""
    from modelkiln.bench.profiling.pyspy import pyspy_binary

    # The child says when its interpreter is up: py-spy attached to a process still
    # starting fails with "Failed to find python version", which is not a refusal.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        dump = subprocess.run([pyspy_binary(), "dump", "--pid", str(child.pid)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        child.kill()
        child.wait()
    if dump.returncode == 0:
        return None
    return (dump.stderr or dump.stdout).strip().splitlines()[0]


def _load(url: str, stop: threading.Event) -> None:
    body = {"model": "enc", "input": ["def add(x, y): return x + y"] * 8}
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            client.post(url + "/v1/embeddings", json=body)


def test_flame_graph_of_a_real_server_found_by_its_port(tmp_path: Path) -> None:
    refusal = ptrace_refusal()
    if refusal is not None:
        pytest.skip(f"py-spy cannot attach in this sandbox (ptrace refused): {refusal}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process(["--model-path", str(tiny_encoder_dir()), "--name", "enc",
                          "--no-monitor"], port)  # fmt: skip
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(url, stop), daemon=True)
    loader.start()
    try:
        time.sleep(0.5)
        out = tmp_path / "flame"
        res = CliRunner().invoke(app, ["profile", "--server", url, "--seconds", "2", "-o",
                                       str(out)])  # fmt: skip
        assert res.exit_code == 0, res.output
    finally:
        stop.set()
        loader.join(30)
        stop_process(proc)
    svg = (out / "flame.svg").read_text()
    assert svg.lstrip().startswith("<?xml")
    assert "modelkiln/serve/" in svg  # the server's own frames were sampled
    info = json.loads((out / "flame.json").read_text())
    assert info["pid"] == proc.pid and proc.pid in info["python_pids"] and info["samples"] > 0


def test_every_worker_of_a_multi_process_server_is_sampled(tmp_path: Path) -> None:
    refusal = ptrace_refusal()
    if refusal is not None:
        pytest.skip(f"py-spy cannot attach in this sandbox (ptrace refused): {refusal}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The workers share one socket: the system's table shows one listener; kiln finds their
    # supervisor so py-spy (--subprocesses) covers both.
    proc = start_process(["--model-path", str(tiny_encoder_dir()), "--name", "enc",
                          "--no-monitor", "--workers", "2", "--set", "cache.enabled=false"],
                         port, timeout=120)  # fmt: skip
    try:
        out = tmp_path / "flame"
        # No load here: --idle samples the waiting threads too (without it an idle server
        # may show no running Python code at all, which is an error of its own).
        res = CliRunner().invoke(app, ["profile", "--server", url, "--seconds", "1", "--idle",
                                       "-o", str(out)])  # fmt: skip
        assert res.exit_code == 0, res.output
    finally:
        stop_process(proc)
    info = json.loads((out / "flame.json").read_text())
    assert info["pid"] == proc.pid and len(info["python_pids"]) == 3  # supervisor + 2 workers
    assert info["idle_threads"] is True and info["samples"] > 0
