"""A real ``prometheus`` on loopback scrapes a running server with the monitor; after drifted
traffic the exported KilnDrift rule fires (scrape and evaluation every 1 s, bounded waits)."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import monitor_support  # noqa: F401  (puts the unit helpers on sys.path)
import pytest
from monitor_helpers import PROSE, code_texts, save_tiny_gpt2
from monitor_support import wait_for
from serve_support import free_port, wait_ready

from modelkiln.monitor.export import PROMETHEUS_YML, export_monitoring
from modelkiln.monitor.online import MonitorConfig
from modelkiln.monitor.profiling import compute_profile
from modelkiln.monitor.serving import monitor_hooks
from modelkiln.serve import create_app
from modelkiln.serve.config import ServeConfig

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/ensure-test-services.sh)"
)


def firing(prom: str) -> set[str]:
    try:
        alerts = httpx.get(prom + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except httpx.TransportError:
        return set()
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_prometheus_scrapes_drift_gauge_and_the_drift_rule_fires(tmp_path: Path) -> None:
    import uvicorn

    model = save_tiny_gpt2(tmp_path / "tiny")
    compute_profile(model, code_texts(150), max_samples=120, gen_tokens=2)
    cfg = ServeConfig.model_validate(
        {"models": [{"path": str(model), "name": "tiny", "precision": "fp32"}]}
    )
    hooks = monitor_hooks(cfg, MonitorConfig(window=40, check_every_requests=10,
                                             check_every_seconds=0.2))  # fmt: skip
    port, prom_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, hooks=hooks), host="127.0.0.1",
                                           port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    out = tmp_path / "monitoring"
    export_monitoring(out, target=f"127.0.0.1:{port}", scrape_interval="1s", drift_for="0s")
    prom_url = f"http://127.0.0.1:{prom_port}"
    proc = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={out / PROMETHEUS_YML}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        with httpx.Client(base_url=url, timeout=30) as c:

            def send(texts: list[str]) -> None:
                for t in texts:
                    body = {"model": "tiny", "prompt": t, "max_tokens": 2, "temperature": 0}
                    assert c.post("/v1/completions", json=body).status_code == 200

            send(code_texts(60, seed=3))
            assert wait_for(lambda: "ml_drift_score" in c.get("/metrics").text, 20)
            assert wait_for(lambda: bool(query(prom_url, "ml_drift_score")), 30)
            assert "KilnDrift" not in firing(prom_url)
            rng = random.Random(0)
            send([" ".join(rng.sample(PROSE, 3)) for _ in range(60)])
            assert wait_for(lambda: "KilnDrift" in firing(prom_url), 40), firing(prom_url)
    finally:
        proc.terminate()
        proc.wait(20)
        server.should_exit = True
        thread.join(30)


def query(prom: str, expr: str) -> list[object]:
    try:
        r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=5)
        return list(r.json()["data"]["result"])
    except (httpx.TransportError, KeyError, ValueError):
        return []
