"""Generation routes: ``/v1/completions``, ``/v1/chat/completions``, the handbook's ``/inference``.

Each handler validates and tokenizes, answers deterministic requests from the
cache, asks admission control for room (429 when full), then runs the
requests on the generation engine — streamed as server-sent events or
collected. A client that disconnects cancels its requests in the engine.
"""

from __future__ import annotations

import abc
import contextlib
import json
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from modelkiln.serve.admission import Ticket
from modelkiln.serve.cache import cache_key
from modelkiln.serve.generation.api import SamplingParams
from modelkiln.serve.generation.runs import (
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
from modelkiln.serve.hooks import note
from modelkiln.serve.http_errors import bad_request
from modelkiln.serve.limits import cancel_on_disconnect
from modelkiln.serve.routing import JSON, admit, cached, guard, state_of
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
from modelkiln.serve.truncation import fit_prompt

router = APIRouter(tags=["generation"])


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


def _json_str(text: str) -> bytes:
    """``text`` as a JSON string, escaped exactly as ``json.dumps`` does (ASCII only)."""
    return encode_basestring_ascii(text).encode("ascii")


def _finish_json(finish: str | None) -> bytes:
    return b"null" if finish is None else _json_str(finish)


class _Chunks(abc.ABC):
    """The SSE events of one streamed response, rendered per token without ``json.dumps``.

    Everything but the choice is fixed for the whole response, so it is encoded
    once; a token then costs one string escape and a bytes format. The bytes are
    exactly what ``sse(dict)`` gives for the same chunk (same keys, same order).
    """

    def __init__(self, rid: str, obj: str, created: int, model: str) -> None:
        base = {"id": rid, "object": obj, "created": created, "model": model}
        # '{"id":...,"model":"m"' then ',"choices":[...]}' per event.
        self.head = b"data: " + json.dumps(base, separators=(",", ":")).encode()[:-1]

    @abc.abstractmethod
    def choice(self, index: int, text: str, finish: str | None) -> bytes:
        """The event of choice ``index`` adding ``text`` (and finishing with ``finish``)."""

    def usage(self, usage: Usage) -> bytes:
        """The final ``stream_options.include_usage`` event: no choices, the token counts."""
        body = json.dumps(usage.model_dump(), separators=(",", ":")).encode()
        return self.head + b',"choices":[],"usage":' + body + b"}\n\n"


class _CompletionChunks(_Chunks):
    """``text_completion`` chunks of ``/v1/completions``."""

    _CHOICE = b'%s,"choices":[{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s}]}\n\n'

    def __init__(self, rid: str, created: int, model: str) -> None:
        super().__init__(rid, "text_completion", created, model)

    def choice(self, index: int, text: str, finish: str | None) -> bytes:
        return self._CHOICE % (self.head, index, _json_str(text), _finish_json(finish))


class _ChatChunks(_Chunks):
    """``chat.completion.chunk`` s: a choice's first chunk carries the assistant role."""

    _CHOICE = b'%s,"choices":[{"index":%d,"delta":{%s},"logprobs":null,"finish_reason":%s}]}\n\n'

    def __init__(self, rid: str, created: int, model: str) -> None:
        super().__init__(rid, "chat.completion.chunk", created, model)
        self.started: set[int] = set()

    def choice(self, index: int, text: str, finish: str | None) -> bytes:
        delta: list[bytes] = []
        if index not in self.started:
            self.started.add(index)
            delta.append(b'"role":"assistant"')
        if text or (finish is None and not delta):
            delta.append(b'"content":' + _json_str(text))
        return self._CHOICE % (self.head, index, b",".join(delta), _finish_json(finish))


DONE = b"data: [DONE]\n\n"


def _fresh_id(request: Request, body: bytes, prefix: str) -> Response:
    data = json.loads(body)
    data["id"], data["created"] = new_id(prefix), int(time.time())
    usage = data.get("usage") or {}
    note(request, cached=True, input_tokens=usage.get("prompt_tokens", 0),
         output_tokens=usage.get("completion_tokens", 0))  # fmt: skip
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


def _text_bytes(text: object) -> int:
    """UTF-8 bytes of a text input or a list of them (token-id inputs count 0)."""
    if isinstance(text, str):
        return len(text.encode("utf-8"))
    if isinstance(text, list):
        return sum(len(t.encode("utf-8")) for t in text if isinstance(t, str))
    return 0


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
    state: ServerState, run: Run, ticket: Ticket, chunks: _Chunks, usage: bool
) -> AsyncIterator[bytes]:
    """SSE body: one chunk per event, errors as error events, then usage and ``[DONE]``.

    Events that were ready together go out in one write (each still its own SSE
    event), and so does the end of the stream with the last token: every write
    costs a trip through the ASGI stack and a syscall, a few more bytes do not.
    """
    timeout = state.cfg.request_timeout_s
    left = len(run.choices)
    try:
        async with contextlib.aclosing(events(run, state.metrics)) as stream:
            async for batch in stream:
                out: list[bytes] = []
                for i, event in batch:
                    if event.finish_reason is not None:
                        left -= 1
                        err = failure(run.choices[i], timeout)
                        if err is not None:
                            out.append(sse(err.body()))  # the openai client raises on it
                            yield b"".join(out)
                            return
                    if event.text or event.finish_reason is not None:
                        out.append(chunks.choice(i, event.text, event.finish_reason))
                if not left:
                    if usage:
                        out.append(chunks.usage(_usage(run)))
                    out.append(DONE)
                if out:
                    yield out[0] if len(out) == 1 else b"".join(out)
    finally:
        ticket.release()


def _usage(run: Run) -> Usage:
    p, c = run.prompt_tokens, run.completion_tokens
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _generate(
    request: Request,
    state: ServerState,
    served: ServedModel,
    prompts: list[list[int]],
    max_tokens: int | None,
    body: CompletionRequest | ChatCompletionRequest,
    route: str,
) -> tuple[Run | None, bytes | None, str | None, Ticket | None]:
    """Validate lengths, guard, try the cache, admit, and build the run (shared by both routes)."""
    cfg = state.cfg
    truncate = cfg.auto_truncate if body.truncate is None else body.truncate
    prompts = [
        fit_prompt(p, context=served.max_model_len, max_tokens=max_tokens, truncate=truncate,
                   max_input_tokens=cfg.max_input_tokens, model=served.name)
        for p in prompts
    ]  # fmt: skip
    limits = [check_prompt(served, p, max_tokens, cfg.max_input_tokens) for p in prompts]
    tokens = sum(len(p) + m for p, m in zip(prompts, limits, strict=True)) * body.n
    guard(request, state, served, tokens)
    note(request, stream=body.stream, prompt_ids=tuple(prompts))
    key = None
    if body.temperature == 0 and not body.stream:
        fields = {"prompts": prompts, "max_tokens": limits, "stop": body.stops, "n": body.n}
        key = cache_key(served.name, served.version, route, fields)
        hit = await cached(state, served, key)
        if hit is not None:
            return None, hit, key, None
    ticket = admit(state, served, tokens)
    params = [_params(body, m) for m in limits]
    wants = state.hooks.sample_logprobs()  # a sampled share: scoring costs engine time
    run = build_run(served, prompts, params, body.n, cfg.request_timeout_s, logprobs=wants)
    note(request, run=run)
    return run, None, key, ticket


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI text completion (``suffix`` = fill-in-the-middle; ``stream`` = SSE)."""
    state = state_of(request)
    served = state.model(request, body.model, "causal_lm")
    prompts = _completion_prompts(served, body)
    note(request, input_bytes=_text_bytes(body.prompt) + _text_bytes(body.suffix))
    run, hit, key, ticket = await _generate(
        request, state, served, prompts, body.max_tokens, body, "completions"
    )
    if hit is not None:
        return _fresh_id(request, hit, "cmpl")
    assert run is not None and ticket is not None
    rid, created = new_id("cmpl"), int(time.time())
    if body.stream:
        chunks = _CompletionChunks(rid, created, served.name)
        return SSEResponse(_stream(state, run, ticket, chunks, body.include_usage))
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
    note(request, input_bytes=sum(_text_bytes(m.text()) for m in body.messages))
    run, hit, key, ticket = await _generate(
        request, state, served, [prompt], body.token_limit, body, "chat"
    )
    if hit is not None:
        return _fresh_id(request, hit, "chatcmpl")
    assert run is not None and ticket is not None
    rid, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        chat_chunks = _ChatChunks(rid, created, served.name)
        return SSEResponse(_stream(state, run, ticket, chat_chunks, body.include_usage))
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
    n = body.num_return_sequences
    tokens = (len(ids) + max_tokens) * n
    guard(request, state, served, tokens)
    note(request, input_bytes=_text_bytes(body.text), prompt_ids=(ids,))
    key = None
    if body.temperature == 0:
        fields = {"ids": ids, "max_tokens": max_tokens, "n": n}
        key = cache_key(served.name, served.version, "inference", fields)
        hit = await cached(state, served, key)
        if hit is not None:
            generated = json.loads(hit).get("tokens_generated", 0)
            note(request, cached=True, input_tokens=len(ids), output_tokens=generated)
            return Response(hit, media_type=JSON)
    ticket = admit(state, served, tokens)
    params = SamplingParams(max_tokens, body.temperature, body.top_p)
    wants = state.hooks.sample_logprobs()  # a sampled share: scoring costs engine time
    run = build_run(served, [ids], [params], n, state.cfg.request_timeout_s, logprobs=wants)
    note(request, run=run)
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
