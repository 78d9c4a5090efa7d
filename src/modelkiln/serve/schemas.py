"""Request and response bodies: the OpenAI API subset modelkiln serves, plus the handbook's.

Requests forbid unknown fields (a typo is a 400 naming the field, not a
silently ignored option). Options the engine does not implement are accepted
only at their neutral value (``logprobs`` null, penalties 0, ``echo`` false),
so clients that send defaults keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TokenIds = list[Annotated[int, Field(ge=0)]]
MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    """Streaming extras."""

    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class _Sampling(_Request):
    """Decoding options shared by completions and chat."""

    model: str = Field(description="Name of a served model (see GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy (cacheable).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k likeliest tokens (0 = off). Extension.")
    n: int = Field(1, ge=1, le=16, description="Choices per prompt.")
    stream: bool = Field(False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} stop strings.")
    seed: int | None = Field(None, description="Seed for sampling (choice i uses seed + i).")
    user: str | None = Field(None, description="End-user id (logged only).")
    presence_penalty: float = Field(0.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (null only).")
    truncate: bool | None = Field(
        None,
        description="Keep the prompt's last tokens when it does not fit the model's context "
        "minus max_tokens, instead of refusing it (400); None: the server's auto_truncate "
        "(TEI's name). usage.prompt_tokens counts the tokens kept.",
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral_only(self) -> Any:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported; send 0 or leave it out")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; leave it out")
        return self

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, texts, token ids, or lists of token ids."
    )
    suffix: str | None = Field(
        None, description="Text after the completion: fill-in-the-middle (needs FIM tokens)."
    )
    max_tokens: int = Field(16, ge=1, description="Most tokens generated per choice.")
    echo: bool = Field(False, description="Not supported (false only).")
    logprobs: int | None = Field(None, description="Not supported (null only).")
    best_of: int | None = Field(None, description="Only equal to n (or null) is supported.")

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n (or be left out)")
        return self


class ContentPart(_Request):
    """A text part of a chat message."""

    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per choice.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported (false/null only).")

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        return self

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (None: up to the context length)."""
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model: str = Field(description="Name of a served encoder.")
    input: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, texts, token ids, or lists of token ids (at most 2048 inputs)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'base64' packs little-endian float32."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first N dimensions (renormalized)."
    )
    truncate: bool | None = Field(
        None,
        description="Cut inputs longer than the model's limit instead of refusing them (400); "
        "None: the server's auto_truncate (TEI's name).",
    )
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError(f"at most 2048 inputs per request (got {len(value)})")
        return value


class InferenceRequest(_Request):
    """The handbook's ``POST /inference``."""

    text: str = Field(description="The prompt.")
    max_length: int = Field(100, ge=1, description="Most new tokens per sequence.")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    num_return_sequences: int = Field(1, ge=1, le=16)
    model: str | None = Field(None, description="Served causal LM (default: the first one).")


class InferenceResponse(BaseModel):
    """The handbook's response."""

    generated_text: list[str]
    inference_time_ms: float
    tokens_generated: int
    tokens_per_second: float


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """``text_completion`` object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    """The assistant's answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One chat completion."""

    index: int
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """``chat.completion`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingData(BaseModel):
    """One vector (a float list, or base64 of little-endian float32)."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    """``list`` of embeddings."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelkiln"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
