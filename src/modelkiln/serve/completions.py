"""Generation routes: ``/v1/completions``, ``/v1/chat/completions``, the handbook's ``/inference``.

Each handler validates and tokenizes, answers deterministic requests from the
cache, asks admission control for room (429 when full), then runs the
requests on the generation engine — streamed as server-sent events or
collected. A client that disconnects cancels its requests in the engine.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from modelkiln.serve.admission import Overloaded, Ticket
from modelkiln.serve.cache import cache_key
from modelkiln.serve.generation.api import SamplingParams
from modelkiln.serve.generation_runs import (
    Run,
    build_run,
    check_prompt,
    collect,
    events,
    failure,
    fim_prompt,
    new_id,
    token_ids,
)
from modelkiln.serve.http_errors import bad_request, overloaded
from modelkiln.serve.limits import cancel_on_disconnect
from modelkiln.serve.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    InferenceRequest,
    InferenceResponse,
    Usage,
)
from modelkiln.serve.state import ServedModel, ServerState

router = APIRouter(tags=["generation"])
JSON = "application/json"


class SSEResponse(StreamingResponse):
    """``text/event-stream`` whose body iterator is always closed (cancelling the engine)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def state_of(request: Request) -> ServerState:
    """The app's :class:`ServerState`."""
    state: ServerState = request.app.state.kiln
    return state


def admit(state: ServerState, served: ServedModel, tokens: int) -> Ticket:
    """A place in the model's queue, or 429."""
    try:
        return served.admission.admit(tokens)
    except Overloaded as exc:
        raise overloaded(exc.reason, exc.message, exc.retry_after) from None


async def cached(state: ServerState, served: ServedModel, key: str | None) -> bytes | None:
    """The cached body for ``key`` (counting hits and misses)."""
    if key is None or not state.cfg.cache.enabled:
        return None
    hit = await state.cache.get(key)
    (state.metrics.cache_hits if hit is not None else state.metrics.cache_misses).labels(
        served.name
    ).inc()
    return hit


def _fresh_id(body: bytes, prefix: str) -> Response:
    data = json.loads(body)
    data["id"], data["created"] = new_id(prefix), int(time.time())
    return Response(json.dumps(data), media_type=JSON)


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    stops = tuple(body.stops)
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, stops)


def _completion_prompts(served: ServedModel, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        texts = [str(p) for p in prompt]
    else:
        texts = None
    if isinstance(prompt, list) and not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    if body.suffix is not None:
        if texts is None or len(texts) != 1:
            raise bad_request("'suffix' needs one text prompt", param="suffix")
        return [fim_prompt(served.tokenizer, texts[0], body.suffix, served.name)]
    if texts is not None:
        return [token_ids(served.tokenizer, t) or _bos(served) for t in texts]
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt]]  # type: ignore[arg-type]
    return [list(p) for p in prompt]  # type: ignore[arg-type]


def _bos(served: ServedModel) -> list[int]:
    """An empty text prompt starts from BOS (or EOS), as OpenAI models do."""
    tok = served.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [start] if start is not None else []


async def _run_collected(request: Request, state: ServerState, run: Run, ticket: Ticket) -> Run:
    try:
        return await cancel_on_disconnect(
            request, collect(run, state.metrics, state.cfg.request_timeout_s)
        )
    finally:
        ticket.release()


async def _stream(
    state: ServerState, run: Run, ticket: Ticket, chunk: Any, usage: bool
) -> AsyncIterator[bytes]:
    """SSE body: ``chunk(index, text, finish_reason)`` per event, errors as error events."""
    timeout = state.cfg.request_timeout_s
    try:
        async with contextlib.aclosing(events(run, state.metrics)) as stream:
            async for i, event in stream:
                if event.finish_reason is not None:
                    err = failure(run.choices[i], timeout)
                    if err is not None:
                        yield sse(err.body())  # the openai client raises on an error event
                        return
                if event.text or event.finish_reason is not None:
                    yield sse(chunk(i, event.text, event.finish_reason))
        if usage:
            yield sse(chunk(None, "", None) | {"choices": [], "usage": _usage(run).model_dump()})
        yield DONE
    finally:
        ticket.release()


def _usage(run: Run) -> Usage:
    p, c = run.prompt_tokens, run.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _generate(
    state: ServerState,
    served: ServedModel,
    prompts: list[list[int]],
    max_tokens: int | None,
    body: CompletionRequest | ChatCompletionRequest,
    route: str,
) -> tuple[Run | None, bytes | None, str | None, Ticket | None]:
    """Validate lengths, try the cache, admit, and build the run (shared by both routes)."""
    cfg = state.cfg
    limits = [check_prompt(served, p, max_tokens, cfg.max_input_tokens) for p in prompts]
    key = None
    if body.temperature == 0 and not body.stream:
        fields = {"prompts": prompts, "max_tokens": limits, "stop": body.stops, "n": body.n}
        key = cache_key(served.name, served.version, route, fields)
        hit = await cached(state, served, key)
        if hit is not None:
            return None, hit, key, None
    tokens = sum(len(p) + m for p, m in zip(prompts, limits, strict=True)) * body.n
    ticket = admit(state, served, tokens)
    params = [_params(body, m) for m in limits]
    return build_run(served, prompts, params, body.n, cfg.request_timeout_s), None, key, ticket


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI text completion (``suffix`` = fill-in-the-middle; ``stream`` = SSE)."""
    state = state_of(request)
    served = state.model(request, body.model, "causal_lm")
    prompts = _completion_prompts(served, body)
    run, hit, key, ticket = await _generate(
        state, served, prompts, body.max_tokens, body, "completions"
    )
    if hit is not None:
        return _fresh_id(hit, "cmpl")
    assert run is not None and ticket is not None
    rid, created = new_id("cmpl"), int(time.time())
    if body.stream:

        def chunk(i: int | None, text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            base = {"id": rid, "object": "text_completion", "created": created}
            return base | {"model": served.name, "choices": [choice]}

        return SSEResponse(_stream(state, run, ticket, chunk, body.include_usage))
    await _run_collected(request, state, run, ticket)
    choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason)
               for c in run.choices]  # fmt: skip
    response = CompletionResponse(
        id=rid, created=created, model=served.name, choices=choices, usage=_usage(run)
    )
    payload = response.model_dump_json().encode()
    if key is not None:
        await state.cache.set(key, payload)
    return Response(payload, media_type=JSON)


def _chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise bad_request(
            f"the tokenizer of {served.name!r} has no chat template, so chat completions are "
            "unavailable for it; use /v1/completions with a plain prompt",
            param="messages",
            code="no_chat_template",
        )
    messages = [m.model_dump(exclude_none=True) | {"content": m.text()} for m in body.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # boundary: templates raise jinja errors for unexpected turns
        raise bad_request(
            f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return token_ids(tok, str(text), special=False)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completion, for models whose tokenizer has a chat template."""
    state = state_of(request)
    served = state.model(request, body.model, "causal_lm")
    prompt = _chat_prompt(served, body)
    run, hit, key, ticket = await _generate(state, served, [prompt], body.token_limit, body, "chat")
    if hit is not None:
        return _fresh_id(hit, "chatcmpl")
    assert run is not None and ticket is not None
    rid, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        started: set[int] = set()

        def chunk(i: int | None, text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, str] = {}
            if i is not None and i not in started:
                started.add(i)
                delta["role"] = "assistant"
            if text or (finish is None and "role" not in delta):
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            base = {"id": rid, "object": "chat.completion.chunk", "created": created}
            return base | {"model": served.name, "choices": [choice]}

        return SSEResponse(_stream(state, run, ticket, chunk, body.include_usage))
    await _run_collected(request, state, run, ticket)
    choices = [
        ChatChoice(index=c.index, message=ChatChoiceMessage(content=c.text),
                   finish_reason=c.finish_reason)
        for c in run.choices
    ]  # fmt: skip
    response = ChatCompletionResponse(
        id=rid, created=created, model=served.name, choices=choices, usage=_usage(run)
    )
    payload = response.model_dump_json().encode()
    if key is not None:
        await state.cache.set(key, payload)
    return Response(payload, media_type=JSON)


@router.post("/inference", response_model=InferenceResponse)
async def inference(body: InferenceRequest, request: Request) -> Response:
    """The handbook's route: generate ``num_return_sequences`` continuations of ``text``."""
    state = state_of(request)
    served = state.model(request, body.model, "causal_lm")
    ids = token_ids(served.tokenizer, body.text) or _bos(served)
    max_tokens = check_prompt(served, ids, body.max_length, state.cfg.max_input_tokens)
    key = None
    if body.temperature == 0:
        fields = {"ids": ids, "max_tokens": max_tokens, "n": body.num_return_sequences}
        key = cache_key(served.name, served.version, "inference", fields)
        hit = await cached(state, served, key)
        if hit is not None:
            return Response(hit, media_type=JSON)
    n = body.num_return_sequences
    ticket = admit(state, served, (len(ids) + max_tokens) * n)
    params = SamplingParams(max_tokens, body.temperature, body.top_p)
    run = build_run(served, [ids], [params], n, state.cfg.request_timeout_s)
    t0 = time.perf_counter()
    await _run_collected(request, state, run, ticket)
    seconds = time.perf_counter() - t0
    tokens = run.completion_tokens
    response = InferenceResponse(
        generated_text=[c.text for c in run.choices],
        inference_time_ms=round(seconds * 1000, 3),
        tokens_generated=tokens,
        tokens_per_second=round(tokens / seconds, 3) if seconds > 0 else 0.0,
    )
    payload = response.model_dump_json().encode()
    if key is not None:
        await state.cache.set(key, payload)
    return Response(payload, media_type=JSON)
