"""``POST /v1/embeddings``: tokenize, cache, admit, batch dynamically, format.

``dimensions`` keeps the first N components and renormalizes them (the
Matryoshka convention OpenAI uses); ``encoding_format="base64"`` packs
little-endian float32, which is what the official client decodes. Floats are
written by orjson straight from the float32 array: ``json.dumps`` of
``tolist()`` was the largest Python cost of a 64-client load after the model.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from modelkiln.contract.serving import OutputRecord
from modelkiln.serve.cache import cache_key
from modelkiln.serve.hooks import note
from modelkiln.serve.http_errors import bad_request, deadline_exceeded
from modelkiln.serve.limits import cancel_on_disconnect
from modelkiln.serve.routing import JSON, admit, cached, guard, state_of
from modelkiln.serve.schemas import EmbeddingRequest, EmbeddingResponse
from modelkiln.serve.state import ServedModel
from modelkiln.serve.truncation import fit, special_suffix

if TYPE_CHECKING:
    import numpy as np

router = APIRouter(tags=["embeddings"])


def _inputs(
    served: ServedModel, body: EmbeddingRequest, max_tokens: int, truncate: bool
) -> list[list[int]]:
    """Token ids of every input, validated against the vocabulary and fitted to the limit."""
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    texts = [x for x in raw if isinstance(x, str)]
    ids: list[list[int]]
    if len(texts) == len(raw):
        ids = [list(x) for x in served.tokenizer(texts)["input_ids"]]
    elif all(isinstance(x, int) for x in raw):
        ids = [[x for x in raw if isinstance(x, int)]]
    else:
        ids = [x for x in raw if isinstance(x, list)]
    over = truncate and len(texts) == len(raw) and any(len(s) > max_tokens for s in ids)
    suffix = special_suffix(served.tokenizer) if over else 0  # ids sent as ids are cut plainly
    ids = fit(ids, max_tokens, truncate=truncate, suffix=suffix, model=served.name)
    vocab = served.vocab_size
    for i, seq in enumerate(ids):
        if not seq:
            raise bad_request(f"input {i} is empty", param="input")
        bad = next((t for t in seq if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"input {i}: token id {bad} is outside the vocabulary ({vocab})")
    return ids


def _format(vectors: np.ndarray, dimensions: int | None, encoding: str) -> list[Any]:
    import numpy as np

    if dimensions is not None:
        vectors = vectors[:, :dimensions]
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    return list(vectors)  # rows of float32: orjson writes each float's shortest repr


@router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """OpenAI embeddings (float or base64; ``dimensions`` truncation)."""
    state = state_of(request)
    served = state.model(request, body.model, "encoder")
    engine = served.engine
    if body.dimensions is not None and body.dimensions > engine.dim:
        raise bad_request(
            f"dimensions={body.dimensions} exceeds the model's {engine.dim}", param="dimensions"
        )
    limit = min(state.cfg.max_input_tokens, engine.max_length)
    truncate = state.cfg.auto_truncate if body.truncate is None else body.truncate
    ids = _inputs(served, body, limit, truncate)
    tokens = sum(len(s) for s in ids)
    guard(request, state, served, tokens)
    raw = [body.input] if isinstance(body.input, str) else body.input
    text_bytes = sum(len(x.encode("utf-8")) for x in raw if isinstance(x, str))
    note(request, input_tokens=tokens, input_bytes=text_bytes, prompt_ids=tuple(ids))
    key = None  # the key is the JSON of every token id: not built when nothing is cached
    if state.cfg.cache.enabled:
        key = cache_key(
            served.name, served.version, "embeddings",
            {"ids": ids, "format": body.encoding_format, "dimensions": body.dimensions},
        )  # fmt: skip
    hit = await cached(state, served, key)
    if hit is not None:
        note(request, cached=True)
        return Response(hit, media_type=JSON)
    timeout = state.cfg.request_timeout_s
    with admit(state, served, tokens):
        try:
            vectors = await cancel_on_disconnect(
                request, asyncio.wait_for(engine.embed(ids), timeout)
            )
        except TimeoutError:
            raise deadline_exceeded(timeout) from None
    state.metrics.tokens.labels(served.name, "in").inc(tokens)
    if state.observers.active:
        note(request, outputs=tuple(OutputRecord(i, embedding=v) for i, v in enumerate(vectors)))
    data = [
        {"object": "embedding", "index": i, "embedding": e}
        for i, e in enumerate(_format(vectors, body.dimensions, body.encoding_format))
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    payload = {"object": "list", "data": data, "model": served.name, "usage": usage}
    encoded = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if key is not None:
        await state.cache.set(key, encoded)
    return Response(encoded, media_type=JSON)
