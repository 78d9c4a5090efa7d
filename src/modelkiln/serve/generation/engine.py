"""The generation engine: scheduler + torch backend + sampling behind an asyncio API.

One asyncio task runs the step loop on the event loop: it asks the
:class:`Scheduler` for a step, runs the model part of it (release, decode,
prefill, sampling, detokenization) in ONE dedicated worker thread so the event
loop never blocks, then reports tokens to the scheduler and pushes
:class:`TokenEvent` s into each request's queue. Scheduler and queues are only
touched on the event loop; the backend only in the worker thread.

Finish reasons: "stop" (EOS or a stop string), "length" (max_tokens or the
model's context), "cancelled" (the stream was closed, shutdown ran past its
drain timeout, or the deadline passed: then ``error == DEADLINE_EXCEEDED``),
"error" (the model step raised; ``error`` says why). The EOS token, when it
ends a request, is reported as the final event's ``token_id`` with text "".

A consumer that stops early must close its stream (``async with
contextlib.aclosing(engine.generate(r)) as events``) or be cancelled while it
awaits the next event; either cancels the request and frees its batch slot.

Example:
    >>> engine = ContinuousBatchingEngine.from_path("runs/x/train/model", max_num_seqs=16)
    >>> await engine.start()
    >>> async for event in engine.generate(GenerationRequest("r1", ids, SamplingParams())):
    ...     print(event.text, end="")
    >>> await engine.shutdown(drain_timeout=10)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from modelkiln.errors import ServingError
from modelkiln.hardware import Precision
from modelkiln.serve.generation.api import (
    FinishReason,
    GenerationRequest,
    TokenEvent,
)
from modelkiln.serve.generation.backend import TorchCausalLMBackend
from modelkiln.serve.generation.ort_backend import OrtCausalLMBackend
from modelkiln.serve.generation.sampling import (
    IncrementalDetokenizer,
    make_generator,
    sample_tokens,
    token_scores,
)
from modelkiln.serve.generation.scheduler import (
    Clock,
    FinishedRequest,
    MonotonicClock,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from modelkiln.serve.generation.stream import RequestStream

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
Backend = TorchCausalLMBackend | OrtCausalLMBackend


@dataclass
class _Live:
    """Engine-side state of one request (event-loop side, plus the worker-owned detokenizer)."""

    request: GenerationRequest
    queue: asyncio.Queue[TokenEvent]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    completion_tokens: int = 0
    done: bool = False


@dataclass(frozen=True)
class _StepResult:
    request_id: str
    token_id: int
    text: str
    stopped: bool
    scores: tuple[float, float] | None = None  # (log p(token), entropy) when asked for


@dataclass
class _Stats:
    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    finished: int = 0
    cancelled: int = 0
    errors: int = 0
    batch_size: int = 0
    step_seconds: float = 0.0
    busy_seconds: float = 0.0


class ContinuousBatchingEngine:
    """Continuous-batching generation over either backend: a :class:`TorchCausalLMBackend`
    (PyTorch) or an :class:`~modelkiln.serve.generation.ort_backend.OrtCausalLMBackend`
    (ONNX Runtime).

    Implements :class:`~modelkiln.serve.generation.api.GenerationEngine`. Call
    :meth:`generate` from the event loop's thread.

    Args:
        backend: the model runner.
        tokenizer: the model's transformers tokenizer (detokenization, EOS).
        model_name: name reported to clients.
        max_num_seqs: most sequences decoded together.
        max_batched_tokens: most tokens per step (new prompt tokens + 1 per running sequence).
        threads: ``torch.set_num_threads`` value applied at start (None: leave torch's default).
        clock: time source for deadlines (tests pass a fake one).
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        *,
        model_name: str = "model",
        max_num_seqs: int = 32,
        max_batched_tokens: int = 2048,
        threads: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.threads = threads
        self.clock: Clock = clock or MonotonicClock()
        config = SchedulerConfig(max_num_seqs, max_batched_tokens, backend.max_model_len)
        eos = _eos_ids(backend, tokenizer)
        self.scheduler = Scheduler(config, clock=self.clock, eos_token_ids=eos)
        self._live: dict[str, _Live] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._accepting = False
        self._stopping = False
        self._stats = _Stats()
        self._adapters: dict[str, str] = {}  # name -> path of LoRA adapters loaded at run time

    @classmethod
    def from_path(
        cls,
        model_dir: str | Path,
        adapter: str | Path | None = None,
        precision: Precision = "auto",
        max_num_seqs: int = 32,
        max_batched_tokens: int = 2048,
        threads: int | None = None,
        model_name: str | None = None,
        backend: Literal["torch", "onnx"] = "torch",
        loader: Callable[[Path], Any] | None = None,
        onnx_session: Any = None,
    ) -> ContinuousBatchingEngine:
        """Load a saved causal LM (+ optional PEFT adapter, merged) and its tokenizer.

        ``precision="auto"`` resolves with :func:`~modelkiln.hardware.resolve_precision`
        (fp32 on CPUs without fast bf16). ``backend="onnx"`` runs the directory's
        ``model_kv.onnx`` (exported at load time when absent) in ONNX Runtime, or
        ``onnx_session`` when a plug-in opened it (e.g. decrypted in memory).

        Raises:
            ServingError: the model, adapter or tokenizer cannot be loaded, or the onnx
                backend is asked for a merged adapter or a half precision.
        """
        from transformers import AutoTokenizer

        runner: Backend
        if backend == "onnx":
            if adapter is not None or precision not in ("auto", "fp32"):
                raise ServingError(
                    f"the onnx generation backend runs its graph as exported; "
                    f"adapter={adapter} / precision={precision!r} need backend: torch",
                    hint="drop adapter/precision, or set backend: torch",
                )
            runner = OrtCausalLMBackend.from_path(model_dir, threads=threads, session=onnx_session)
        else:
            runner = TorchCausalLMBackend.from_path(
                model_dir, adapter=adapter, precision=precision, loader=loader
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise ServingError(
                f"cannot load the tokenizer from '{model_dir}': {exc}",
                hint="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
            ) from exc
        name = model_name or Path(model_dir).resolve().name
        return cls(
            runner,
            tokenizer,
            model_name=name,
            max_num_seqs=max_num_seqs,
            max_batched_tokens=max_batched_tokens,
            threads=threads,
        )

    # --------------------------------------------------------------- protocol
    async def start(self) -> None:
        """Warm the model in the worker thread and start the step loop."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-gen")
        if self.threads is not None:
            await self._run(_set_threads, self.threads)
        await self._run(self.backend.warmup)
        self._wake = asyncio.Event()
        self._stopping = False
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="kiln-generation-loop")

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting; give in-flight requests ``drain_timeout`` s, then cancel the rest."""
        self._accepting = False
        if self._task is None:
            return
        deadline = time.monotonic() + max(drain_timeout, 0.0)
        while self.scheduler.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for finished in self.scheduler.abort_all("engine shut down"):
            self._finish(finished)
        self._stopping = True
        self._poke()
        await self._task
        self._task = None
        await self._run(self.backend.reset)
        assert self._executor is not None
        self._executor.shutdown(wait=True)
        self._executor = None

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue ``request`` now and return its event stream; ``aclose()`` cancels it.

        Raises:
            ServingError: the engine is not running (not started or draining), or the
                request is invalid (empty prompt, max_tokens < 1, too long, duplicate id).
        """
        if not self._accepting:
            raise ServingError(
                "the generation engine is not accepting requests (not started or shutting down)",
                hint="wait for /ready or retry on another replica",
            )
        if request.adapter is not None and request.adapter not in self._adapters:
            raise ServingError(
                f"no adapter named {request.adapter!r} is loaded",
                hint="load it with POST /admin/adapters",
            )
        if request.arrival == 0.0:
            request.arrival = self.clock.now()
        self.scheduler.add(request)
        live = _Live(
            request,
            asyncio.Queue(),
            IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.params.stop),
            make_generator(request.params),
        )
        self._live[request.request_id] = live
        self._poke()
        return RequestStream(live.queue, lambda: self.cancel(request.request_id))

    def stats(self) -> dict[str, float]:
        """Live numbers: running, waiting, last batch size, tokens in/out, steps, finishes."""
        s = self._stats
        return {
            "running": float(self.scheduler.num_running),
            "waiting": float(self.scheduler.num_waiting),
            "batch_size": float(s.batch_size),
            "tokens_in": float(s.tokens_in),
            "tokens_out": float(s.tokens_out),
            "steps": float(s.steps),
            "requests_finished": float(s.finished),
            "requests_cancelled": float(s.cancelled),
            "requests_failed": float(s.errors),
            "last_step_seconds": s.step_seconds,
            "busy_seconds": s.busy_seconds,
        }

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA adapters loaded at run time: name -> directory."""
        return dict(self._adapters)

    async def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter (in the worker thread, between steps) under ``name``.

        Raises:
            ServingError: the engine is not running, the name is taken or the adapter is invalid.
        """
        if self._executor is None:
            raise ServingError("the generation engine is not running", hint="wait for /ready")
        if name in self._adapters:
            raise ServingError(f"an adapter named {name!r} is already loaded", hint="unload it")
        await self._run(self.backend.load_adapter, name, path)
        self._adapters[name] = str(path)

    async def unload_adapter(self, name: str) -> int:
        """Unload adapter ``name``: its unfinished requests are cancelled. Returns their count.

        Raises:
            ServingError: no adapter of that name is loaded.
        """
        if name not in self._adapters:
            raise ServingError(f"no adapter named {name!r} is loaded", hint="list the adapters")
        del self._adapters[name]  # from here on, generate() refuses it
        users = [rid for rid, live in self._live.items() if live.request.adapter == name]
        for rid in users:
            finished = self.scheduler.cancel(rid, f"adapter {name!r} was unloaded")
            if finished is not None:
                self._finish(finished)
        # Released rows leave the KV cache before the next forward; this job runs after the
        # current step in the same worker thread, so no forward pass sees a missing adapter.
        await self._run(self._release_and_unload, users, name)
        self._poke()
        return len(users)

    def _release_and_unload(self, rids: list[str], name: str) -> None:
        self.backend.release(rids)
        self.backend.unload_adapter(name)

    def cancel(self, request_id: str) -> bool:
        """Cancel a request by id (what closing its stream does); False if already finished."""
        finished = self.scheduler.cancel(request_id)
        if finished is not None:
            self._finish(finished)
            self._poke()
        return finished is not None

    # ------------------------------------------------------------------- loop
    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self.scheduler.has_work():
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except Exception as exc:  # boundary: one bad step must not kill the server
                log.exception("generation step failed; failing the running requests")
                await self._run(self.backend.reset)
                for rid in self.scheduler.running_ids():
                    if self.scheduler.cancel(rid) is not None:
                        self._finish(FinishedRequest(rid, "error", f"{type(exc).__name__}: {exc}"))

    async def _step(self) -> None:
        out = self.scheduler.schedule()
        for finished in out.expired:
            self._finish(finished)
        # Captured here: the worker must not read self._live, which cancels mutate.
        lives = [self._live[s.request_id] for s in out.decode + out.prefill]
        started = time.perf_counter()
        results = await self._run(self._execute, out, lives)
        self._record(out, results, time.perf_counter() - started)
        self._deliver(results)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the worker thread (the only thread that touches the backend)."""
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _execute(self, out: SchedulerOutput, lives: list[_Live]) -> list[_StepResult]:
        """Worker thread: free finished rows, run decode + prefill, sample, detokenize."""
        import torch

        self.backend.release(out.released)
        if not out.has_model_work:
            return []
        seqs, parts = [], []
        if out.decode:
            rids = [s.request_id for s in out.decode]
            parts.append(self.backend.decode(rids, [s.last_token for s in out.decode]))
            seqs += out.decode
        if out.prefill:
            adapters = {s.request_id: s.request.adapter for s in out.prefill if s.request.adapter}
            parts.append(
                self.backend.prefill(
                    [(s.request_id, s.request.prompt_ids) for s in out.prefill], adapters
                )
            )
            seqs += out.prefill
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        params = [s.params for s in seqs]
        tokens = sample_tokens(logits, params, [live.generator for live in lives])
        scores = token_scores(logits, tokens, [p.logprobs for p in params])
        results = []
        for seq, live, token, score in zip(seqs, lives, tokens, scores, strict=True):
            text = live.detok.push(token)
            results.append(_StepResult(seq.request_id, token, text, live.detok.stopped, score))
        return results

    def _deliver(self, results: list[_StepResult]) -> None:
        sampled = {r.request_id: r.token_id for r in results}
        stopped = {r.request_id for r in results if r.stopped}
        finished = {f.request_id: f for f in self.scheduler.update(sampled, stopped)}
        for r in results:
            live = self._live.get(r.request_id)
            if live is None or live.done:
                continue  # cancelled while the step ran
            live.completion_tokens += 1
            end = finished.get(r.request_id)
            text = r.text + (live.detok.flush() if end is not None else "")
            self._emit(live, r.token_id, text, end.reason if end else None, None, r.scores)
            if end is not None:
                self._close(live, end.reason)

    def _finish(self, finished: FinishedRequest) -> None:
        """Final event for a request that left without a token (cancelled, expired, failed)."""
        live = self._live.get(finished.request_id)
        if live is None or live.done:
            return
        self._emit(live, None, "", finished.reason, finished.error)
        self._close(live, finished.reason)

    def _emit(
        self,
        live: _Live,
        token_id: int | None,
        text: str,
        reason: FinishReason | None,
        error: str | None,
        scores: tuple[float, float] | None = None,
    ) -> None:
        event = TokenEvent(
            live.request.request_id,
            token_id,
            text,
            reason,
            prompt_tokens=len(live.request.prompt_ids),
            completion_tokens=live.completion_tokens,
            error=error,
            logprob=scores[0] if scores else None,
            entropy=scores[1] if scores else None,
        )
        live.queue.put_nowait(event)

    def _close(self, live: _Live, reason: FinishReason) -> None:
        live.done = True
        del self._live[live.request.request_id]
        s = self._stats
        s.finished += reason in ("stop", "length")
        s.cancelled += reason == "cancelled"
        s.errors += reason == "error"

    def _record(self, out: SchedulerOutput, results: list[_StepResult], seconds: float) -> None:
        s = self._stats
        if out.has_model_work:
            s.steps += 1
            s.batch_size = len(out.prefill) + len(out.decode)
            s.tokens_in += sum(seq.prompt_len for seq in out.prefill)
            s.tokens_out += len(results)
            s.step_seconds = seconds
            s.busy_seconds += seconds

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _eos_ids(backend: Backend, tokenizer: Any) -> set[int]:
    """EOS ids of the generation config and the tokenizer (as vLLM does: their union)."""
    ids: set[int] = set()
    eos = getattr(backend.generation_config, "eos_token_id", None)
    for value in eos if isinstance(eos, list | tuple) else [eos]:
        if value is not None:
            ids.add(int(value))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


if TYPE_CHECKING:  # mypy proves the engine meets the HTTP layer's contract
    from modelkiln.serve.generation.api import GenerationEngine

    _CONTRACT: type[GenerationEngine] = ContinuousBatchingEngine
