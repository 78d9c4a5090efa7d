"""The ``monitor`` pipeline stage's own parts: its config, its traffic, its receiver, its report.

The stage's run — profile the served model on the data stage's held-out split,
serve it with the monitor and an alert rule, replay held-out traffic (no drift
expected) then English prose (drift expected), and check that an alert reached
a webhook receiver on loopback — composes the server and the load generator,
so it lives in the wiring layer (:func:`modelkiln.pipeline_monitor.run_monitor_stage`).

Stage layout (``out``)::

    report.md          the section of the run report: verdicts, per-feature figures, plots
    profile/           the reference profile (profile.json + arrays) of the served model
    features.jsonl     every replayed request's features (no prompts)
    held_out/ prose/   each phase's offline drift report (report.json/.html/.png)
    alerts.jsonl       every alert event and delivery outcome
    monitor.json       both phases' final states and the alerts the receiver got

Example:
    >>> text_chunks(["a\\nb\\nc\\n"], lines=2)
    ['a\\nb\\n', 'c\\n']
    >>> prose_texts(2, seed=0)[0][:1].isupper()
    True
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from modelkiln.configbase import KilnModel

__all__ = ["MonitorStageConfig", "WebhookSink", "prose_texts", "request_profile",
           "stage_report", "text_chunks", "webhook_sink"]  # fmt: skip


class MonitorStageConfig(KilnModel):
    """The ``monitor`` stage: profile size, replayed traffic and the online monitor's settings."""

    profile_samples: int = Field(150, ge=20, description="Held-out chunks in the profile.")
    requests: int = Field(60, ge=20, description="Requests replayed per phase (held-out, prose).")
    chunk_lines: int = Field(8, ge=1, description="Lines per held-out chunk (one request each).")
    max_prompt_tokens: int = Field(64, ge=4, description="Prompt cut, in profile and replay.")
    max_tokens: int = Field(4, ge=1, description="Greedy tokens per request (and per profile row).")
    window: int = Field(50, ge=20, description="Values per feature window of the online monitor.")
    check_every_requests: int = Field(10, ge=1, description="Test the windows every N requests.")
    false_alarm_rate: float = Field(
        1e-4, gt=0, lt=1, description="Target false alarms per request without drift."
    )
    concurrency: int = Field(4, ge=1, description="Concurrent streams of each replay.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads of the server.")
    alert_timeout_s: float = Field(30.0, gt=0, description="Most seconds to wait for the alert.")
    startup_timeout_s: float = Field(120.0, gt=0, description="Most seconds to wait for /ready.")
    profile_promoted: bool = Field(
        True,
        description="Write a reference profile next to the optimize stage's promoted model "
        "(held-out test split; profile_samples, chunk_lines, max_prompt_tokens, max_tokens).",
    )


def text_chunks(texts: Sequence[str], lines: int) -> list[str]:
    """Every text cut into chunks of ``lines`` lines (blank-only chunks dropped).

    The held-out split holds few, long files; one request per chunk gives enough
    requests for a profile and a replay from disjoint chunks.
    """
    chunks = []
    for text in texts:
        rows = text.splitlines(keepends=True)
        for i in range(0, len(rows), lines):
            chunk = "".join(rows[i : i + lines])
            if chunk.strip():
                chunks.append(chunk)
    return chunks


#: Plain English words: prose traffic is a different distribution from code.
_WORD_TEXT = (
    "the a river town people morning evening garden travel quiet music story letter "
    "window mountain friend family summer winter market street village children "
    "teacher library history painting weather forest ocean journey kitchen bread "
    "walked talked remembered wondered waited listened smiled borrowed painted "
    "slowly warmly often never always gently after before during through across "
    "beautiful old young bright cold green golden small famous careful happy"
)
_WORDS = _WORD_TEXT.split()


def prose_texts(n: int, seed: int) -> list[str]:
    """``n`` English paragraphs of one to three seeded sentences (no download, no data set)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    return out


def request_profile(
    model_dir: Path, texts: Sequence[str], out: Path, *, model_name: str,
    max_prompt_tokens: int, source: str,
) -> Path:  # fmt: skip
    """A profile of request features only (they need the tokenizer, not the model's logits)."""
    from modelkiln.contract.hfmodel import load_tokenizer
    from modelkiln.monitor.features import common_ids_leave_one_out
    from modelkiln.monitor.profile import model_hash, write_profile
    from modelkiln.monitor.profiling import _request_features, _tokenizer_info

    tok = load_tokenizer(model_dir)
    ids = [np.asarray(tok(t, add_special_tokens=False)["input_ids"][:max_prompt_tokens])
           for t in texts]  # fmt: skip
    prompts = [str(tok.decode(a.tolist())) for a in ids]
    common, rare = common_ids_leave_one_out(ids, len(tok))
    return write_profile(
        out, _request_features(tok, ids, prompts, rare), model_name=model_name,
        model_hash=model_hash(model_dir), source=source,
        extras={"common_token_ids": common, "tokenizer_info": _tokenizer_info(tok)},
    )  # fmt: skip


class WebhookSink:
    """JSON bodies POSTed to a local receiver."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bodies: list[Any] = []
        self.lock = threading.Lock()

    def firing(self) -> list[Any]:
        """The ``firing`` notifications received so far."""
        with self.lock:
            return [b for b in self.bodies if isinstance(b, dict) and b.get("status") == "firing"]


@contextmanager
def webhook_sink() -> Iterator[WebhookSink]:
    """A webhook receiver on 127.0.0.1 (a free port) that keeps every JSON body it gets.

    Hand-written on the stdlib's http.server: twenty lines, no dependency, and the
    stage must own the receiver it proves delivery to.
    """
    holder: dict[str, WebhookSink] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            with holder["s"].lock:
                holder["s"].bodies.append(body)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:  # no stderr lines per request
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["s"] = WebhookSink(f"http://127.0.0.1:{server.server_address[1]}/alerts")
    thread = threading.Thread(target=server.serve_forever, name="kiln-webhook", daemon=True)
    thread.start()
    try:
        yield holder["s"]
    finally:
        server.shutdown()
        server.server_close()


def _fmt(v: Any, digits: str = ".3g") -> str:
    return "–" if v is None else format(v, digits)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def stage_report(summary: dict[str, Any], note: str) -> str:
    """The ``## Monitor`` section: verdict per phase, per-feature figures, plots."""
    lines = [
        "## Monitor",
        "",
        f"Served `{summary['served_path']}` ({note}) with the online drift monitor "
        f"(window {summary['window']}, checked every {summary['check_every_requests']} requests, "
        f"thresholds calibrated to {summary['false_alarm_rate']:g} false alarms per request), "
        f"profiled on {summary['profile_rows']} held-out chunks of the data stage's test split.",
        "",
        "| phase | requests (errors) | drift detected | drifted features |",
        "|---|---|---|---|",
    ]
    for name, p in summary["phases"].items():
        lines.append(f"| {name} | {p['requests']} ({p['errors']}) | "
                     f"{'yes' if p['drift_detected'] else 'no'} | "
                     f"{', '.join(p['drifted_features']) or '–'} |")  # fmt: skip
    alerts = summary["alerts_received"]
    lines += [
        "",
        f"Alerts received by the webhook on 127.0.0.1: {len(alerts)} firing"
        + (f" (first: `{alerts[0].get('summary', '')}`)." if alerts else "."),
        "",
        "Per feature, last online check of each phase (score 1.0 = calibrated threshold):",
        "",
        "| phase | feature | test | statistic | p-value | threshold | score | drift |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in summary["phases"].items():
        for f in p["features"]:
            lines.append(f"| {name} | {f['feature']} | {f['test']} | {_fmt(f['statistic'])} | "
                         f"{_fmt(f['p_value'])} | {_fmt(f['threshold'])} | "
                         f"{_fmt(f['score'], '.2f')} | {_yes(f['drifted'])} |")  # fmt: skip
    for name in summary["phases"]:
        lines += ["", f"![{name}: reference vs replayed]({name}/report.png)"]
    return "\n".join(lines) + "\n"
