"""Test doubles for the HTTP layer: a scripted generation engine, a tiny BERT encoder,
and an ASGI client that runs the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator, Coroutine
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import httpx

from modelkiln.config import TokenizerConfig
from modelkiln.data.tokenizer import train_tokenizer
from modelkiln.serve.config import ModelSpec, ServeConfig
from modelkiln.serve.generation.api import FinishReason, GenerationRequest, TokenEvent

T = TypeVar("T")
TEXTS = ["def add(x, y):\n    return x + y\n\n", "class A:\n    pass\n", "hello world\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion (no pytest-asyncio needed)."""
    return asyncio.run(coro)


@lru_cache(maxsize=1)
def _code_tokenizer() -> Any:
    return train_tokenizer(TEXTS * 20, TokenizerConfig(vocab_size=300))


def code_tokenizer(chat: bool = False) -> Any:
    """A byte-level BPE tokenizer with FIM tokens (and a chat template if ``chat``)."""
    tok = copy.deepcopy(_code_tokenizer())
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


class FakeEngine:
    """Generation engine double: choice k emits ``"t0 t1 ..."`` one token per ``delay`` s.

    Records every request, honours deadlines and ``stop`` strings, and notes which
    requests were closed before they finished (``cancelled``).
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        *,
        delay: float = 0.0,
        max_model_len: int = 128,
        start_delay: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else code_tokenizer()
        self.model_name = "fake"
        self.delay = delay
        self.start_delay = start_delay
        self.max_model_len = max_model_len
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.started = False
        self.stopped = False
        self.active = 0

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self.started = True

    async def shutdown(self, drain_timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        self.stopped = True

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        return self._stream(request)

    def stats(self) -> dict[str, float]:
        return {"running": float(self.active), "requests": float(len(self.requests))}

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        rid, n_prompt, params = request.request_id, len(request.prompt_ids), request.params
        text, finished = "", False
        self.active += 1
        try:
            for i in range(params.max_tokens):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if request.deadline is not None and loop.time() > request.deadline:
                    finished = True
                    yield TokenEvent(rid, None, "", "cancelled", n_prompt, i, "deadline exceeded")
                    return
                piece = f"t{i} "
                text += piece
                stop = next((s for s in params.stop if s in text), None)
                last = i == params.max_tokens - 1 or stop is not None
                reason: FinishReason | None = ("stop" if stop else "length") if last else None
                if stop is not None:
                    piece = piece[: len(piece) - (len(text) - text.index(stop))]
                finished = last
                scores = (-0.5 * (i + 1), 1.0) if params.logprobs else (None, None)
                yield TokenEvent(rid, 10 + i, piece, reason, n_prompt, i + 1, None, *scores)
                if last:
                    return
        finally:
            self.active -= 1
            if not finished:
                self.cancelled.append(rid)


@lru_cache(maxsize=1)
def tiny_encoder_dir() -> Path:
    """A 2-layer random BERT + WordPiece tokenizer saved with save_pretrained (cached per run)."""
    import atexit
    import shutil
    import tempfile

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.replace("\n", " ").split()} | set("abcdefgxyz"))
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    out = Path(tempfile.mkdtemp(prefix="kiln-tiny-bert-"))
    atexit.register(shutil.rmtree, out, True)
    BertModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def config(**kwargs: Any) -> ServeConfig:
    """A ServeConfig for a fake LM "lm" (and the tiny encoder as "enc" when asked)."""
    models = kwargs.pop("models", [{"path": "fake", "name": "lm"}])
    return ServeConfig.model_validate({"models": models, **kwargs})


def encoder_spec() -> dict[str, Any]:
    """The tiny encoder as a model spec named "enc" (fp32: "auto" is bf16 on AVX512-BF16 CPUs)."""
    spec = ModelSpec(path=tiny_encoder_dir(), name="enc", precision="fp32")
    return spec.model_dump(mode="json")


@contextlib.asynccontextmanager
async def client(
    app: Any, *, ready: bool = True, **kwargs: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``app`` in-process, with its lifespan running."""
    async with app.router.lifespan_context(app):
        if ready:
            assert await app.state.kiln.wait_ready(30), app.state.kiln.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln", **kwargs) as c:
            yield c


def sse_events(body: str) -> list[Any]:
    """The JSON payloads of a server-sent-event body ("[DONE]" kept as a string)."""
    events = []
    for block in body.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
