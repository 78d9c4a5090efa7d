"""SLO strings, arrival shapes, traces, the rate search and sweep (fake runs), bootstrap
comparisons with --fail-if-slower, and the JSONL history."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelkiln.bench import LoadReport, RequestResult
from modelkiln.bench.outputs.serialized import append_history, read_history
from modelkiln.bench.profiles import arrival_offsets, load_trace
from modelkiln.bench.profiles.goodput import search_rate
from modelkiln.bench.profiles.sweep import sweep
from modelkiln.bench.slo import parse_slo
from modelkiln.cli import app
from modelkiln.errors import ArtifactError, ConfigError


def fake_report(rate: float, capacity: float = 20.0, n: int = 200, seed: int = 0) -> LoadReport:
    """A run whose latency grows as ``rate`` nears ``capacity`` (M/M/1-like mean)."""
    rng = random.Random(seed)
    mean = 1 / (capacity - rate) if rate < capacity else 10.0
    results = [
        RequestResult(
            start=i / rate,
            status=200,
            latency=rng.expovariate(1 / mean),
            ttft=0.001,
            scheduled=i / rate,
        )
        for i in range(n)
    ]
    return LoadReport("fake", n / min(rate, capacity), results)


def test_slo_strings_parse_and_bad_ones_name_the_term() -> None:
    spec = parse_slo("ttft_p95=500ms, tpot_p95=50ms,e2e_p99=2s,itl_p50=800us")
    got = {t.name: t.bound_s for t in spec.targets}
    assert got == pytest.approx(
        {"ttft_p95": 0.5, "tpot_p95": 0.05, "e2e_p99": 2.0, "itl_p50": 8e-4}
    )
    assert spec.per_request().ttft_s == 0.5 and spec.per_request().e2e_s == 2.0
    for bad in ("ttft=5ms", "ttft_p95=fast", "speed_p95=1ms", "ttft_p95=1h", ""):
        with pytest.raises(ConfigError, match="cannot parse SLO term"):
            parse_slo(bad)


def test_arrivals_have_the_asked_rate_and_shape() -> None:
    n = 4000
    for arrival, cv in (("constant", 0.0), ("poisson", 1.0), ("gamma", 2.0)):
        gen = arrival_offsets(50.0, arrival, burstiness=0.25, seed=1)
        t = [next(gen) for _ in range(n)]
        gaps = [b - a for a, b in zip([0.0, *t], t, strict=False)]
        assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.08)
        assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, abs=0.15)


def test_trace_files_sort_shift_and_reject_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(
        '{"timestamp_ms": 3000, "input_length": 3, "output_length": 5}\n\n'
        '{"timestamp": 2.0, "prompt": "hi"}\n'
    )
    trace = load_trace(f, speedup=2.0, default_output=7)
    assert [(t.offset_s, t.prompt, t.max_tokens) for t in trace] == [
        (0.0, "hi", 7),
        (0.5, "the model kiln", 5),
    ]
    f.write_text('{"timestamp": -1, "output_tokens": 3}\n')
    with pytest.raises(ConfigError, match="negative time"):
        load_trace(f)
    f.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"malformed trace line .*t.jsonl:1"):
        load_trace(f)
    with pytest.raises(ConfigError, match="trace file not found"):
        load_trace(tmp_path / "none.jsonl")


def test_search_brackets_the_capacity_and_sweep_stops_at_saturation() -> None:
    spec = parse_slo("e2e_p95=300ms")  # M/M/1 p95 = 3/(20-rate): met below rate 10
    found = search_rate(lambda r: fake_report(r), spec, start_rate=1.0, iterations=5)
    assert found.best_rate is not None and 8.0 <= found.best_rate <= 10.5
    assert len(found.probes) <= 8 + 5 + 1
    assert found.ci_low is None or found.ci_low <= found.best_rate
    assert found.ci_high is None or found.ci_high > found.best_rate
    res = sweep(lambda r: fake_report(r), 2.0, max_steps=6)
    assert res.saturated_at == 32.0 and len(res.steps) == 5  # 2, 4, 8, 16 keep up; 32 does not
    with pytest.raises(ConfigError):
        sweep(lambda r: fake_report(r), 0.0)


def _serve_json(path: Path, scale: float) -> Path:
    report = fake_report(5.0, seed=int(scale * 10))
    for r in report.results:
        r.latency *= scale
    path.write_text(json.dumps({"url": "x", "run": report.to_dict()}))
    return path


def test_compare_calls_only_significant_changes_and_fails_ci(tmp_path: Path) -> None:
    a, same, slow = (
        _serve_json(tmp_path / f"{n}.json", s)
        for n, s in (("a", 1.0), ("same", 1.01), ("slow", 1.5))
    )
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "bench",
            "compare",
            str(a),
            str(same),
            "--fail-if-slower",
            "10%",
            "--json",
            str(tmp_path / "c.json"),
            "--plot",
            str(tmp_path / "c.png"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    latency = next(r for r in rows if r["metric"] == "latency")
    assert latency["verdict"] == "no significant change" and latency["ci"][0] < 1 < latency["ci"][1]
    assert (tmp_path / "c.png").is_file()
    bad = runner.invoke(app, ["bench", "compare", str(a), str(slow), "--fail-if-slower", "10%"])
    assert bad.exit_code == 1 and "slower than 10%" in bad.output
    err = runner.invoke(app, ["bench", "compare", str(a)])
    assert err.exit_code == 2 and "at least two" in err.output


def test_history_appends_and_plots(tmp_path: Path) -> None:
    h = tmp_path / "h.jsonl"
    for rps in (1.0, 2.0):
        append_history({"url": "u", "model": "m", "summary": {"throughput_rps": rps}}, h)
    assert [e["metrics"]["throughput_rps"] for e in read_history(h)] == [1.0, 2.0]
    out = CliRunner().invoke(
        app,
        [
            "bench",
            "history",
            str(h),
            "--metric",
            "throughput_rps",
            "--plot",
            str(tmp_path / "h.png"),
        ],
    )
    assert out.exit_code == 0 and (tmp_path / "h.png").is_file()
    h.write_text("{bad\n")
    with pytest.raises(ArtifactError, match="is not JSON"):
        read_history(h)


def test_fifo_queue_waits_behind_earlier_requests() -> None:
    from modelkiln.bench.stats import fifo_response_times

    # 200 ms each: the second arrives at 100 ms and waits 100 ms, the third waits 250 ms.
    got = fifo_response_times([0.0, 0.1, 0.15, 2.0], [0.2, 0.2, 0.2, 0.2])
    assert got == pytest.approx([0.2, 0.3, 0.45, 0.2])
