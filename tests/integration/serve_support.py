"""Shared pieces of the serving integration tests: free ports, servers in threads or
subprocesses, a tiny GPT-2 directory, the unit tests' doubles."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "serve"))

from http_helpers import FakeEngine, code_tokenizer

__all__ = [
    "FakeEngine",
    "code_tokenizer",
    "free_port",
    "save_tiny_gpt2",
    "start_process",
    "wait_ready",
]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None,
               headers: dict[str, str] | None = None) -> None:  # fmt: skip
    """Poll ``url``/ready until 200; fail with the process output if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}:\n{out}")
        try:
            if httpx.get(url + "/ready", timeout=1, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout} s")


def start_process(args: list[str], port: int, timeout: float = 60) -> subprocess.Popen[str]:
    """``python -m modelkiln.serve ARGS --port PORT`` on loopback, once ready."""
    env = os.environ | {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelkiln.serve", *args, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def save_tiny_gpt2(path: Path) -> Path:
    """A 2-layer random GPT-2 with the FIM-capable code tokenizer, saved with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelkiln.data.tokenizer import save_tokenizer

    tok = code_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=len(tok),
        eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    save_tokenizer(tok, path)
    return path
