"""Acceptance: a served model with its profile; no drift -> no alert; drift -> exactly one
alert at a real webhook receiver, a Slack-style receiver and a real SMTP server; back to
normal -> a resolved notice. A dead webhook is retried and never blocks serving."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import monitor_support  # noqa: F401  (puts the unit helpers on sys.path)
from http_helpers import client, run
from monitor_helpers import PROSE, code_texts, save_tiny_gpt2
from monitor_support import http_receiver, smtp_server, until, wait_for
from serve_support import free_port

from modelkiln.monitor.online import MonitorConfig
from modelkiln.monitor.profiling import compute_profile
from modelkiln.monitor.serving import monitor_hooks
from modelkiln.serve import create_app
from modelkiln.serve.config import ServeConfig


def prose(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(PROSE, 3)) for _ in range(n)]


def firing(items: list[Any]) -> int:
    return sum(1 for b in items if b.get("status") == "firing")


def test_drift_alert_once_per_channel_then_resolved(tmp_path: Path) -> None:
    model = save_tiny_gpt2(tmp_path / "tiny")
    compute_profile(model, code_texts(150), max_samples=120, gen_tokens=2)
    smtp_port, dead = free_port(), free_port()
    with http_receiver() as hook, smtp_server(smtp_port) as mails:
        rules = tmp_path / "alerts.yaml"
        rules.write_text(json.dumps({
            "channels": [
                {"name": "hook", "type": "webhook", "url": hook.url + "/hook"},
                {"name": "chat", "type": "slack", "url": hook.url + "/slack"},
                {"name": "mail", "type": "email", "port": smtp_port, "to": ["ops@localhost"]},
                {"name": "dead", "type": "webhook", "url": f"http://127.0.0.1:{dead}/x",
                 "timeout_s": 0.5},
            ],
            "rules": [{"name": "input-drift", "kind": "drift", "feature": "*"}],
            "retry_attempts": 2, "retry_backoff_s": 0.1, "log": str(tmp_path / "alerts.jsonl"),
        }))  # fmt: skip
        cfg = ServeConfig.model_validate(
            {"models": [{"path": str(model), "name": "tiny", "precision": "fp32"}]}
        )
        mcfg = MonitorConfig(window=40, check_every_requests=10, check_every_seconds=0.2)
        hooks = monitor_hooks(cfg, mcfg, alert_rules=rules)

        async def go() -> None:
            app = create_app(cfg, hooks=hooks)
            async with client(app) as c:

                async def send(texts: list[str]) -> None:
                    for t in texts:
                        body = {"model": "tiny", "prompt": t, "max_tokens": 2, "temperature": 0}
                        r = await c.post("/v1/completions", json=body)
                        assert r.status_code == 200, r.text
                    assert app.state.kiln.observers.flush(10)

                async def checked() -> dict[str, Any]:
                    # checks run on the monitor's thread every 10 requests (or 0.2 s)
                    async def done() -> bool:
                        m = (await c.get("/v1/monitor")).json()["models"][0]
                        return bool(m["features"]) and all(
                            f["checked_at"] > sent_at for f in m["features"])  # fmt: skip

                    assert await until(done)
                    return dict((await c.get("/v1/monitor")).json())

                sent_at = time.time()
                await send(code_texts(80, seed=7))
                m = (await checked())["models"][0]
                assert m["profile"]["status"] == "ok", m
                assert not m["drift_detected"], m["features"]
                assert hook.on("/hook") == [] and mails == []

                await send(prose(60, seed=1))
                assert await until(lambda: len(hook.on("/hook")) >= 1 and len(mails) >= 1)
                sent_at = time.time()
                await send(prose(30, seed=2))  # drift goes on: no second alert
                snap = await checked()
                assert snap["models"][0]["drift_detected"] and snap["alerts"]
                metrics = (await c.get("/metrics")).text
                assert 'ml_drift_detected{feature="input_tokens"' in metrics

                await send(code_texts(80, seed=9))
                assert await until(lambda: any(b["status"] == "resolved" for b in hook.on("/hook")))

        run(go())
        assert wait_for(lambda: len(mails) >= 2)
    assert firing(hook.on("/hook")) == 1
    assert [b["status"] for b in hook.on("/hook")] == ["firing", "resolved"]
    assert [":rotating_light:" in b["text"] for b in hook.on("/slack")] == [True, False]
    assert len(mails) == 2 and "[firing]" in mails[0] and "[resolved]" in mails[1]
    log = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    dead_events = [e["event"] for e in log if e.get("channel") == "dead"]
    assert "delivery_failed" in dead_events  # retried, and serving never waited for it
