"""The load generator against a real server on loopback (scripted engines): closed and open
loop, TTFT / TPOT / ITL, percentiles, goodput, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from http_helpers import FakeEngine, tiny_encoder_dir

from modelkiln.bench import SLO, LoadReport, RequestResult, percentile, run_load
from modelkiln.errors import ConfigError
from modelkiln.serve import ModelServer, ServeConfig


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = FakeEngine(delay=0.01, max_model_len=4096)
    models = [{"path": "fake", "name": "lm"}, {"path": str(tiny_encoder_dir()), "name": "enc"}]
    cfg = ServeConfig.model_validate({"models": models, "port": 0, "cache": {"enabled": False}})
    server = ModelServer(config=cfg, engines={"lm": engine})
    yield server.start(timeout=60)
    server.stop()


def test_closed_loop_measures_every_streamed_token(url: str) -> None:
    done: list[RequestResult] = []  # what a progress bar gets, once per completed request
    report = run_load(url, ["a b", "c"], model="lm", concurrency=3, num_requests=9, max_tokens=6,
                      on_result=done.append)  # fmt: skip
    assert report.mode == "closed loop, concurrency 3" and len(report.results) == 9
    assert sorted(map(id, done)) == sorted(map(id, report.results))
    assert all(r.latency > 0 for r in done)
    for r in report.results:
        assert r.ok and r.completion_tokens == 6 and len(r.itl) == 5
        assert r.ttft is not None and 0.005 < r.ttft < r.latency
        assert r.tpot is not None and r.tpot >= 0.005  # the engine sleeps 10 ms per token
    s = report.summary(SLO(ttft_s=10, tpot_s=10))
    assert s["ok"] == 9 and s["errors"] == 0 and s["output_tokens"] == 54
    assert s["ttft_p50_ms"] <= s["ttft_p95_ms"] <= s["ttft_p99_ms"]
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"]) and s["slo_attainment"] == 1.0
    strict = report.summary(SLO(ttft_s=10, tpot_s=0.001))
    assert strict["goodput_rps"] == 0 and strict["slo_attainment"] == 0


def test_open_loop_poisson_is_seeded_and_errors_are_counted(url: str) -> None:
    a = run_load(url, ["x"], model="lm", rate=50, num_requests=10, max_tokens=2, seed=7)
    b = run_load(url, ["x"], model="lm", rate=50, num_requests=10, max_tokens=2, seed=7)
    assert a.mode == "open loop, Poisson 50 req/s" and len(a.results) == 10
    # The seed fixes the schedule (actual send times move with the machine's load).
    sched_a = sorted(r.scheduled for r in a.results if r.scheduled is not None)
    assert len(sched_a) == 10 and sched_a == sorted(r.scheduled for r in b.results)  # type: ignore[type-var]
    bad = run_load(url, ["x"], model="nope", concurrency=2, num_requests=4, max_tokens=2)
    s = bad.summary()
    assert s["errors"] == 4 and s["ok"] == 0 and "model_not_found" in s["first_error"]
    assert s["ttft_p50_ms"] is None


def test_embeddings_and_argument_checks(url: str) -> None:
    report = run_load(url, ["def f", "class A"], kind="embeddings", model="enc", concurrency=2,
                      num_requests=6)  # fmt: skip
    assert all(r.ok and r.ttft == r.latency for r in report.results)
    with pytest.raises(ConfigError, match="exactly one"):
        run_load(url, ["x"], model="lm", concurrency=2, rate=1.0, num_requests=1)
    with pytest.raises(ConfigError, match="num_requests or duration_s"):
        run_load(url, ["x"], model="lm", concurrency=2)


def test_percentiles_and_tpot_definitions() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    r = RequestResult(start=0, status=200, latency=1.0, ttft=0.1, completion_tokens=10)
    assert r.tpot == pytest.approx(0.1)
    assert RequestResult(start=0, status=200, latency=1, ttft=0.5, completion_tokens=1).tpot is None
    report = LoadReport("x", 2.0, [r, RequestResult(start=0, status=500, error="boom")])
    s = report.summary(SLO(ttft_s=0.2, tpot_s=0.2))
    assert s["throughput_rps"] == 0.5 and s["goodput_rps"] == 0.5 and s["errors"] == 1


def test_models_are_listed_and_serve_bench_defaults_to_the_first(url: str) -> None:
    from modelkiln.bench.backends.openai import list_models
    from modelkiln.bench.serving import make_config, run_serve_bench

    assert list_models(url) == ["lm", "enc"]
    res = run_serve_bench(make_config(url=url, concurrency=2, requests=4, max_tokens=3,
                                      slo="ttft_p99=10s,tpot_p99=10s"))  # fmt: skip
    assert res["model"] == "lm" and res["summary"]["ok"] == 4 and res["slo"]["met"]
    assert res["summary"]["goodput_rps"] == pytest.approx(res["summary"]["throughput_rps"])
    with pytest.raises(ConfigError, match="bad option arrival='bursty'"):
        make_config(url=url, rate=1.0, arrival="bursty", requests=1)
    with pytest.raises(ConfigError, match="choose one mode"):
        run_serve_bench(make_config(url=url, rate=1.0, concurrency=2, requests=1))
