"""The monitor stage's own parts: held-out chunks, prose traffic, the webhook receiver, report."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from modelkiln.monitor.stage import (
    MonitorStageConfig,
    prose_texts,
    stage_report,
    text_chunks,
    webhook_sink,
)


def test_text_chunks_cut_by_lines_and_drop_blank_chunks() -> None:
    chunks = text_chunks(["a\nb\nc\n", "\n\n\nd"], lines=2)
    assert chunks == ["a\nb\n", "c\n", "\nd"]


def test_prose_is_seeded_english_without_code() -> None:
    a, b = prose_texts(20, seed=3), prose_texts(20, seed=3)
    assert a == b and a != prose_texts(20, seed=4)
    assert all(t.endswith(".") and t[0].isupper() for t in a)
    assert not any(ch in "".join(a) for ch in "():=\n")


def test_webhook_sink_keeps_json_bodies_and_reports_firing_ones() -> None:
    with webhook_sink() as sink:
        assert sink.url.startswith("http://127.0.0.1:")
        httpx.post(sink.url, json={"status": "firing", "rule": "drift"}, timeout=5)
        httpx.post(sink.url, json={"status": "resolved", "rule": "drift"}, timeout=5)
        assert [b["status"] for b in sink.bodies] == ["firing", "resolved"]
        assert sink.firing() == [{"status": "firing", "rule": "drift"}]


def test_config_rejects_unknown_fields_and_tiny_windows() -> None:
    with pytest.raises(ValidationError):
        MonitorStageConfig.model_validate({"windw": 50})
    with pytest.raises(ValidationError):
        MonitorStageConfig(window=5)


def test_report_has_a_row_per_phase_and_feature_and_the_plots() -> None:
    feat = {"feature": "byte_length", "test": "ks", "statistic": 0.6, "p_value": 1e-8,
            "threshold": 5e-5, "score": 1.7, "drifted": True, "n_current": 40}  # fmt: skip
    phases = {
        "held_out": {"requests": 50, "errors": 0, "drift_detected": False,
                     "drifted_features": [], "features": [{**feat, "drifted": False}]},
        "prose": {"requests": 50, "errors": 0, "drift_detected": True,
                  "drifted_features": ["byte_length"], "features": [feat]},
    }  # fmt: skip
    summary = {"served_path": "m", "window": 40, "check_every_requests": 10,
               "false_alarm_rate": 1e-4, "profile_rows": 80, "phases": phases,
               "alerts_received": [{"status": "firing", "summary": "drift on model"}]}  # fmt: skip
    md = stage_report(summary, "trained model")
    assert "| held_out | 50 (0) | no | – |" in md
    assert "| prose | 50 (0) | yes | byte_length |" in md
    assert "| prose | byte_length | ks | 0.6 |" in md
    assert "1 firing" in md and "(prose/report.png)" in md
