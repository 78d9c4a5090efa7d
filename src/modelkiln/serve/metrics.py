"""Prometheus metrics of one server, in a registry of its own (two apps never collide).

The handbook's two metrics keep their names and buckets
(``ml_requests_total{model_name,version,status}``,
``ml_request_duration_seconds{model_name,version}``); ``status`` is the HTTP
status code. The rest cover what a serving engine needs watched: time to
first token, inter-token latency, queue time, batch size, tokens in/out,
cache hits/misses and rejections by reason, plus engine gauges read at scrape
time.

Example:
    >>> m = ServeMetrics()
    >>> m.requests.labels("minilm", "1", "200").inc()
    >>> b"ml_requests_total" in m.render()
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Buckets of ``ml_request_duration_seconds`` (the handbook's, seconds).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Routes whose requests are counted in ``ml_requests_total``.
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/inference")


class _EngineCollector(Collector):
    """Gauges read from each engine's ``stats()`` at scrape time."""

    def __init__(self, sources: Callable[[], Iterable[tuple[str, dict[str, float]]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for model, stats in self._sources():
            for key, value in stats.items():
                name = "ml_engine_" + key
                if name not in families:
                    families[name] = GaugeMetricFamily(
                        name, f"Engine statistic '{key}'", labels=["model_name"]
                    )
                families[name].add_metric([model], float(value))
        yield from families.values()


class ServeMetrics:
    """Every metric of one server; ``render()`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model = ["model_name"]
        self.requests = Counter(
            "ml_requests_total", "Requests by model and HTTP status",
            ["model_name", "version", "status"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "ml_request_duration_seconds", "Request latency (to the last byte)",
            ["model_name", "version"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "ml_time_to_first_token_seconds", "Time to the first generated token",
            model, buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "ml_inter_token_latency_seconds", "Time between consecutive generated tokens",
            model, buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "ml_queue_time_seconds", "Time an input waited before its batch ran",
            model, buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "ml_batch_size", "Sequences per encoder forward pass",
            model, buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "ml_tokens_total", "Tokens processed", ["model_name", "direction"], registry=r
        )
        self.cache_hits = Counter("ml_cache_hits_total", "Response cache hits", model, registry=r)
        self.cache_misses = Counter(
            "ml_cache_misses_total", "Response cache misses", model, registry=r
        )
        self.rejections = Counter(
            "ml_rejections_total", "Requests refused before running, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("ml_requests_in_flight", "Requests being served", registry=r)
        self.ready = Gauge("ml_ready", "1 when every model is loaded and warm", registry=r)
        self.cold_start = Gauge(
            "ml_cold_start_seconds", "Seconds from process start to ready", registry=r
        )

    def watch_engines(self, sources: Callable[[], Iterable[tuple[str, dict[str, float]]]]) -> None:
        """Export each engine's ``stats()`` as ``ml_engine_<key>{model_name}`` gauges."""
        self.registry.register(_EngineCollector(sources))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
