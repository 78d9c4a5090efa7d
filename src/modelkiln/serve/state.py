"""What one server holds: its models and engines, caches, metrics and lifecycle flags.

Models are loaded after the server starts listening (so ``/health`` answers
while weights load) on a worker thread; ``/ready`` turns 200 once every engine
is loaded and warm, and 503 again as soon as draining starts.

Building an engine from a model directory is :mod:`.loading`'s job; this
module only adopts, starts, looks up and drains the engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request

from modelkiln.contract.serving import ServeHooks
from modelkiln.serve.access import APIKeys
from modelkiln.serve.admission import AdmissionController
from modelkiln.serve.cache import ResponseCache, make_cache
from modelkiln.serve.config import ServeConfig
from modelkiln.serve.embeddings import BatchStats
from modelkiln.serve.hooks import ObserverHub
from modelkiln.serve.http_errors import APIError, bad_request, model_not_found, unavailable
from modelkiln.serve.loading import Kind, load_engine
from modelkiln.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model as the HTTP layer sees it."""

    name: str
    version: str
    kind: Kind
    engine: Any  # GenerationEngine (causal_lm) or EmbeddingEngine (encoder)
    admission: AdmissionController
    created: int = field(default_factory=lambda: int(time.time()))
    adapter: str | None = None  # LoRA adapter loaded at run time, when named "base:adapter"

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer."""
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids below this are valid: the smaller of the tokenizer's and the model's."""
        sizes = [len(self.tokenizer)]
        backend = getattr(self.engine, "backend", None)
        for owner in (backend, getattr(backend, "model", None)):
            value = getattr(getattr(owner, "config", None), "vocab_size", None)
            if isinstance(value, int):
                sizes.append(value)
                break
        return min(sizes)

    @property
    def max_model_len(self) -> int | None:
        """Longest prompt + completion a causal LM takes (None if unknown)."""
        for owner in (self.engine, getattr(self.engine, "backend", None)):
            value = getattr(owner, "max_model_len", None)
            if isinstance(value, int):
                return value
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 1_000_000 else None


class ServerState:
    """Models, engines, cache, metrics and lifecycle of one app.

    Args:
        cfg: the server config.
        engines: prebuilt engines by served name (tests, embedding in other apps);
            models not in it are loaded from ``cfg.models``.
        started: process start (``time.monotonic``) for the cold-start figure.
        on_fatal: called when loading fails (the server then exits).
        hooks: what plug-ins add (observers, authenticator, guards, collectors, checks).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        engines: dict[str, Any] | None = None,
        *,
        started: float | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        hooks: ServeHooks | None = None,
    ) -> None:
        self.cfg = cfg
        self.hooks = hooks or ServeHooks()
        self.observers = ObserverHub(self.hooks.observers)
        self.metrics = ServeMetrics()
        for collector in self.hooks.collectors:
            self.metrics.registry.register(collector)
        if self.observers.active:
            self.metrics.registry.register(self.observers)
        self.cache: ResponseCache = make_cache(cfg.cache)
        self.keys = APIKeys(cfg.resolved_api_keys())
        self.admin_keys = APIKeys(cfg.resolved_admin_keys())
        # (model, adapter) -> load count: part of the adapter's version, so a reloaded adapter
        # never answers from the cached responses of its previous weights.
        self.adapter_loads: dict[tuple[str, str], int] = {}
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        self.draining = False
        self.drain_deadline: float | None = None  # monotonic time by which draining must end
        self.load_error: BaseException | None = None
        self.started = started if started is not None else time.monotonic()
        self.on_fatal = on_fatal
        self._given = dict(engines or {})
        self._ready_event = asyncio.Event()
        self.metrics.watch_engines(self._engine_stats)

    # ------------------------------------------------------------ lifecycle
    async def load(self) -> None:
        """Load (or adopt) every engine, start and warm it, then turn ready."""
        try:
            for name, engine in self._given.items():
                spec = next((s for s in self.cfg.models if s.served_name == name), None)
                await self._adopt(name, spec.version if spec else "1", engine)
            for spec in self.cfg.models:
                if spec.served_name in self._given:
                    continue
                t0 = time.monotonic()
                await asyncio.to_thread(self.check_model, spec.path)
                engine = await asyncio.to_thread(
                    load_engine,
                    spec,
                    self.cfg,
                    self._on_batch_for(spec.served_name),
                    self.hooks.model_loader,
                    self.hooks.onnx_loader,
                )
                await self._adopt(spec.served_name, spec.version, engine)
                log.info(
                    "loaded %s from %s in %.2f s",
                    spec.served_name,
                    spec.path,
                    time.monotonic() - t0,
                )
        except Exception as exc:  # boundary: report the failure, let the server exit
            self.load_error = exc
            log.error("cannot start serving: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self.ready = True
        self._ready_event.set()
        cold = time.monotonic() - self.started
        self.metrics.ready.set(1)
        self.metrics.cold_start.set(cold)
        log.info("ready: serving %s (cold start %.2f s)", ", ".join(self.models), cold)

    async def _adopt(self, name: str, version: str, engine: Any) -> None:
        kind: Kind = "encoder" if hasattr(engine, "embed") else "causal_lm"
        if kind == "encoder" and getattr(engine, "on_batch", None) is None:
            engine.on_batch = self._on_batch_for(name)
        await engine.start()
        gate = AdmissionController(
            self.cfg.max_queued_requests,
            self.cfg.max_queued_tokens,
            max_wait_s=self.cfg.queue_wait_s,
            # a continuous-batching engine starts a request at once while it has a free slot
            slots=self.cfg.generation.max_num_seqs if kind == "causal_lm" else 0,
        )
        calibrate = getattr(engine, "calibrate", None)
        if calibrate is not None:  # a rate from the start: no cold-queue refusals
            calibration = await calibrate()
            gate.record_batch(*calibration)
            log.info("%s: a full batch of %d tokens took %.2f s (the queue-wait estimate's "
                     "first rate)", name, calibration[1], calibration[0])  # fmt: skip
        self.models[name] = ServedModel(name, version, kind, engine, gate)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until ready (True) or the timeout passes (False)."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def shutdown(self, drain_timeout: float) -> None:
        """Drain every engine within ``drain_timeout`` s, then close the cache."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        deadline = time.monotonic() + drain_timeout
        for served in self.models.values():
            try:
                await served.engine.shutdown(max(0.0, deadline - time.monotonic()))
            except Exception:  # boundary: one engine failing to stop must not block the others
                log.exception("engine %s did not shut down cleanly", served.name)
        await self.cache.close()
        await asyncio.to_thread(self.observers.close)

    def check_model(self, path: str | Path) -> None:
        """Run the plug-ins' checks on a model or adapter directory before it loads.

        Raises:
            KilnError: a check refused the directory.
        """
        for check in self.hooks.model_checks:
            check(Path(path))

    # -------------------------------------------------------------- lookups
    def model(self, request: Request, name: str | None, kind: Kind) -> ServedModel:
        """The served model a request names, checked for kind and lifecycle.

        Raises:
            APIError: 503 draining or not ready, 404 unknown model, 400 wrong kind.
        """
        if self.draining:
            raise unavailable("the server is shutting down", "draining")
        if name is None:
            first = next((m for m in self.models.values() if m.kind == kind), None)
            if first is None:
                if not self.ready:
                    raise unavailable("the models are still loading", "not_ready")
                raise bad_request(f"this server serves no {kind.replace('_', ' ')} model")
            name = first.name
        served = self.models.get(name) or self.adapter_model(name)
        if served is None:
            if not self.ready and name in {s.served_name for s in self.cfg.models}:
                raise unavailable(f"the model {name!r} is still loading", "not_ready")
            raise model_not_found(name, self.model_ids())
        request.scope.setdefault("state", {})["model"] = (served.name, served.version)
        if served.kind != kind:
            route = "/v1/embeddings" if served.kind == "encoder" else "/v1/completions"
            what = "an encoder" if served.kind == "encoder" else "a causal LM"
            raise APIError(
                400,
                f"the model {name!r} is {what}; use {route}",
                code="wrong_model_kind",
                param="model",
            )
        return served

    def adapter_model(self, name: str) -> ServedModel | None:
        """The served view of ``"base:adapter"`` when that adapter is loaded, else None."""
        base_name, sep, adapter = name.rpartition(":")
        base = self.models.get(base_name) if sep else None
        if base is None or adapter not in getattr(base.engine, "adapters", {}):
            return None
        loads = self.adapter_loads.get((base.name, adapter), 1)
        return dataclasses.replace(
            base, name=name, version=f"{base.version}+{adapter}.{loads}", adapter=adapter
        )

    def model_ids(self) -> list[str]:
        """Every name a request may pass as ``model``: models, then ``model:adapter``."""
        ids = list(self.models)
        for served in self.models.values():
            ids += [f"{served.name}:{a}" for a in sorted(getattr(served.engine, "adapters", {}))]
        return ids

    # --------------------------------------------------------------- metrics
    def _on_batch_for(self, name: str) -> Callable[[BatchStats], None]:
        def record(stats: BatchStats) -> None:
            served = self.models.get(name)
            if served is not None:  # the service rate of the queue-wait admission
                served.admission.record_batch(stats.seconds, stats.tokens)
            self.metrics.batch_size.labels(name).observe(stats.size)
            for q in stats.queue_seconds:
                self.metrics.queue_time.labels(name).observe(q)

        return record

    def _engine_stats(self) -> list[tuple[str, dict[str, float]]]:
        out = []
        for served in list(self.models.values()):
            try:
                out.append((served.name, dict(served.engine.stats())))
            except Exception:  # boundary: a scrape must not fail because of one engine
                log.debug("stats() of %s failed", served.name, exc_info=True)
        return out
