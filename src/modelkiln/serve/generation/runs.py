"""Running OpenAI-style generation requests on a generation engine.

One HTTP request becomes ``len(prompts) * n`` :class:`GenerationRequest` s
(choice ``index = prompt_i * n + j``, as the OpenAI API numbers them). Their
event streams are merged into one stream of ``(index, event)`` batches (a
single choice is read straight from the engine); closing it closes every
engine stream, which cancels the requests inside the engine (client
disconnects, deadlines).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelkiln.contract.serving import OutputRecord
from modelkiln.serve.generation.api import GenerationRequest, SamplingParams, TokenEvent
from modelkiln.serve.http_errors import APIError, bad_request, deadline_exceeded

if TYPE_CHECKING:  # the HTTP layer's types; the engine package never imports it at run time
    from modelkiln.serve.metrics import ServeMetrics
    from modelkiln.serve.state import ServedModel

#: ``TokenEvent.error`` of a request past its deadline (the engine's wording).
DEADLINE_TEXT = "deadline exceeded"


@dataclass
class ChoiceOutput:
    """What one choice produced."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprob_sum: float = 0.0  # over the tokens the engine scored (SamplingParams.logprobs)
    entropy_sum: float = 0.0
    scored: int = 0


@dataclass
class Run:
    """The requests of one HTTP call and what they produced."""

    served: ServedModel
    requests: list[GenerationRequest]
    n_prompts: int = 1
    choices: list[ChoiceOutput] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens counted once per prompt (as the OpenAI API does)."""
        per_prompt: dict[int, int] = {}
        n = max(1, len(self.requests) // max(1, self.n_prompts))
        for c in self.choices:
            per_prompt[c.index // n] = c.prompt_tokens
        return sum(per_prompt.values())

    @property
    def completion_tokens(self) -> int:
        """Generated tokens of every choice."""
        return sum(c.completion_tokens for c in self.choices)

    def outputs(self) -> tuple[OutputRecord, ...]:
        """Each choice as the request observers see it."""
        return tuple(
            OutputRecord(
                c.index,
                c.completion_tokens,
                c.finish_reason,
                c.logprob_sum / c.scored if c.scored else None,
                c.entropy_sum / c.scored if c.scored else None,
            )
            for c in self.choices
        )


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def token_ids(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """Token ids of ``text`` (special tokens added when the tokenizer adds them)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def fim_prompt(tokenizer: Any, prefix: str, suffix: str, model: str) -> list[int]:
    """Prefix-suffix-middle prompt: ``<fim_prefix>P<fim_suffix>S<fim_middle>``.

    Raises:
        APIError: 400 when the tokenizer has no FIM tokens.
    """
    vocab = tokenizer.get_vocab()
    names = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    missing = [t for t in names if t not in vocab]
    if missing:
        raise bad_request(
            f"'suffix' needs fill-in-the-middle tokens, and the tokenizer of {model!r} lacks "
            f"{', '.join(missing)}; leave 'suffix' out",
            param="suffix",
        )
    pre, suf, mid = (vocab[t] for t in names)
    return [
        pre,
        *token_ids(tokenizer, prefix, special=False),
        suf,
        *token_ids(tokenizer, suffix, special=False),
        mid,
    ]


def check_prompt(
    served: ServedModel, ids: list[int], max_tokens: int | None, max_input_tokens: int
) -> int:
    """Validate one prompt; return the max_tokens to use (defaulted to the context left).

    Raises:
        APIError: 400 for an empty prompt, unknown token ids, or a too long request.
    """
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    vocab = served.vocab_size
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise bad_request(
            f"token id {bad} is outside the vocabulary (size {vocab})", param="prompt"
        )
    context = served.max_model_len
    limit = min(max_input_tokens, context - 1) if context else max_input_tokens
    if len(ids) > limit:
        raise bad_request(
            f"the prompt has {len(ids)} tokens; the limit is {limit}",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return max(1, (context or len(ids) + 256) - len(ids))
    if context and len(ids) + max_tokens > context:
        raise bad_request(
            f"this model's maximum context length is {context} tokens, but {len(ids) + max_tokens} "
            f"were requested ({len(ids)} in the prompt, {max_tokens} in the completion); "
            "lower max_tokens or shorten the prompt",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def build_run(
    served: ServedModel,
    prompts: list[list[int]],
    params: list[SamplingParams],
    n: int,
    timeout_s: float,
    *,
    logprobs: bool = False,
) -> Run:
    """One GenerationRequest per (prompt, choice); ``params[i]`` is prompt i's settings.

    ``logprobs``: have the engine score every token (for the request observers).
    """
    clock = getattr(served.engine, "clock", None)
    now = clock.now() if clock is not None else time.monotonic()
    base = uuid.uuid4().hex
    requests = []
    for p, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
        for j in range(n):
            seed = None if sp.seed is None else sp.seed + j
            choice_params = dataclasses.replace(sp, seed=seed, logprobs=sp.logprobs or logprobs)
            rid = f"{base}-{p * n + j}"
            requests.append(
                GenerationRequest(
                    rid, ids, choice_params, deadline=now + timeout_s, adapter=served.adapter
                )
            )
    return Run(served, requests, len(prompts), [ChoiceOutput(i) for i in range(len(requests))])


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


#: ``(choice index, event)`` pairs that were ready together, in arrival order.
Batch = list[tuple[int, TokenEvent]]


class _Tally:
    """Books each event into ``run.choices`` and the TTFT / ITL histograms."""

    def __init__(self, run: Run, metrics: ServeMetrics) -> None:
        self.run = run
        # Label lookups take a lock and build a tuple: resolve them once per run, not per token.
        self.ttft = metrics.ttft.labels(run.served.name)
        self.itl = metrics.itl.labels(run.served.name)
        self.last = [run.started] * len(run.requests)

    def add(self, i: int, item: TokenEvent | BaseException | None) -> TokenEvent:
        """Book choice ``i``'s event (an engine failure or a stream that just ended: an error)."""
        if not isinstance(item, TokenEvent):
            error = "the engine's stream ended early" if item is None else repr(item)
            item = TokenEvent(self.run.requests[i].request_id, None, "", "error", error=error)
        c = self.run.choices[i]
        if item.token_id is not None:
            now = time.perf_counter()
            (self.ttft if c.completion_tokens == 0 else self.itl).observe(now - self.last[i])
            self.last[i] = now
        c.text += item.text
        if item.logprob is not None:
            c.logprob_sum += item.logprob
            c.entropy_sum += item.entropy or 0.0
            c.scored += 1
        c.prompt_tokens = item.prompt_tokens or c.prompt_tokens
        c.completion_tokens = item.completion_tokens or c.completion_tokens
        if item.finish_reason is not None:
            c.finish_reason, c.error = item.finish_reason, item.error
        return item


async def events(run: Run, metrics: ServeMetrics) -> AsyncGenerator[Batch, None]:
    """Submit the run's requests and yield their events, in batches, until all finish.

    A batch holds every event that was already waiting when the consumer asked
    (never waiting for more), so a lagging consumer can answer several at once.
    Records time to first token and inter-token latency; fills ``run.choices``.
    Closing the iterator cancels whatever is still running.
    """
    engine = run.served.engine
    streams: list[AsyncIterator[TokenEvent]] = []
    try:
        for request in run.requests:
            streams.append(engine.generate(request))
    except BaseException:
        for stream in streams:  # the engine refused one: withdraw the others
            await _close(stream)
        raise
    tally = _Tally(run, metrics)
    tasks: list[asyncio.Task[None]] = []
    try:
        if len(streams) == 1:
            # One choice (the common case): read the engine's stream directly; a pump task
            # and a merged queue would add a task switch and two queue operations per token.
            # Events the engine queued while this consumer was busy come along in the same
            # batch (``ready()`` of the engine's stream, when it has one), never waited for.
            stream = streams[0]
            ready = getattr(stream, "ready", None)
            while True:
                item: TokenEvent | BaseException | None
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    item = None
                except Exception as exc:  # boundary: surface engine failures as an error event
                    item = exc
                got = [(0, tally.add(0, item))]
                if ready is not None and got[-1][1].finish_reason is None:
                    got += [(0, tally.add(0, more)) for more in ready()]
                yield got
                if got[-1][1].finish_reason is not None:
                    return
        queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[TokenEvent]) -> None:
            try:
                async for event in stream:
                    await queue.put((i, event))
                    if event.finish_reason is not None:
                        return
                await queue.put((i, None))
            except Exception as exc:  # boundary: surface engine failures as an error event
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            booked = [(i, tally.add(i, item)) for i, item in batch]
            remaining -= sum(event.finish_reason is not None for _, event in booked)
            yield booked
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await _close(stream)
        metrics.tokens.labels(run.served.name, "in").inc(run.prompt_tokens)
        metrics.tokens.labels(run.served.name, "out").inc(run.completion_tokens)


def failure(choice: ChoiceOutput, timeout_s: float) -> APIError | None:
    """The HTTP error a finished choice stands for (None when it finished normally)."""
    if choice.finish_reason in ("stop", "length"):
        return None
    if choice.error and DEADLINE_TEXT in choice.error:
        return deadline_exceeded(timeout_s)
    if choice.finish_reason == "cancelled":
        return APIError(
            503, f"the request was cancelled: {choice.error or 'shutdown'}", code="cancelled"
        )
    return APIError(
        500, f"generation failed: {choice.error or 'unknown error'}", code="engine_error"
    )


async def collect(run: Run, metrics: ServeMetrics, timeout_s: float) -> Run:
    """Run to completion; raise the first choice's failure as an :class:`APIError`.

    Raises:
        APIError: 504 past the deadline, 503 cancelled by shutdown, 500 engine error.
    """
    try:
        async with asyncio.timeout(timeout_s + 1.0):  # backstop if the engine ignores deadlines
            stream = events(run, metrics)
            try:
                async for _ in stream:
                    pass
            finally:
                await stream.aclose()
    except TimeoutError:
        raise deadline_exceeded(timeout_s) from None
    for choice in run.choices:
        err = failure(choice, timeout_s)
        if err is not None:
            raise err
    return run
