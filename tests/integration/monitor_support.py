"""Real receivers on loopback for the monitor tests: an HTTP webhook sink and an SMTP server."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "monitor"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "serve"))


class Receiver:
    """Collected webhook bodies by path."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.bodies: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def on(self, path: str) -> list[Any]:
        with self.lock:
            return [b for p, b in self.bodies if p == path]


@contextmanager
def http_receiver() -> Iterator[Receiver]:
    """A ThreadingHTTPServer on 127.0.0.1 that stores every POSTed JSON body."""
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with holder["r"].lock:
                holder["r"].bodies.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = Receiver(server.server_address[1])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield holder["r"]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def smtp_server(port: int) -> Iterator[list[str]]:
    """A real aiosmtpd SMTP server on 127.0.0.1:port; yields the received messages."""
    from aiosmtpd.controller import Controller

    messages: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            messages.append(envelope.content.decode("utf8", errors="replace"))
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield messages
    finally:
        controller.stop()


async def until(cond: Callable[[], Any], timeout: float = 30.0) -> bool:
    """``wait_for`` for async tests: polls without blocking the event loop."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond() if asyncio.iscoroutinefunction(cond) else cond():
            return True
        await asyncio.sleep(0.05)
    return False


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@contextmanager
def monitored_server(tmp_path: Path) -> Iterator[str]:
    """A tiny GPT-2 with its profile served by uvicorn on loopback with the monitor; its URL."""
    import uvicorn
    from monitor_helpers import code_texts, save_tiny_gpt2
    from serve_support import free_port, wait_ready

    from modelkiln.monitor.online import MonitorConfig
    from modelkiln.monitor.profiling import compute_profile
    from modelkiln.monitor.serving import monitor_hooks
    from modelkiln.serve import create_app
    from modelkiln.serve.config import ServeConfig

    model = save_tiny_gpt2(tmp_path / "tiny")
    compute_profile(model, code_texts(150), max_samples=120, gen_tokens=2)
    cfg = ServeConfig.model_validate(
        {"models": [{"path": str(model), "name": "tiny", "precision": "fp32"}]}
    )
    mcfg = MonitorConfig(window=40, check_every_requests=10, check_every_seconds=0.2)
    port = free_port()
    app = create_app(cfg, hooks=monitor_hooks(cfg, mcfg))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def send_completions(url: str, texts: list[str]) -> None:
    """One greedy 2-token completion per text; every answer must be 200."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        for t in texts:
            body = {"model": "tiny", "prompt": t, "max_tokens": 2, "temperature": 0}
            assert c.post("/v1/completions", json=body).status_code == 200
