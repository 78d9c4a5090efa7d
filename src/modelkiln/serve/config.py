"""Validated configuration of the serving stage (``kiln serve`` / ``python -m modelkiln.serve``).

One :class:`ServeConfig` describes one server process: which model directories
it serves, where it listens, who may call it, how much work it queues, how
encoder batches are formed and where responses are cached.

Example:
    >>> cfg = ServeConfig(models=[ModelSpec(path="runs/x/train/model")], port=8000)
    >>> cfg.models[0].served_name
    'model'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from modelkiln.configbase import KilnModel, load_section
from modelkiln.hardware import Precision

#: Environment variable holding comma-separated API keys (added to ``api_keys``).
API_KEYS_ENV = "MODELKILN_API_KEYS"
#: Environment variable holding comma-separated admin keys (added to ``admin_keys``).
ADMIN_KEYS_ENV = "MODELKILN_ADMIN_KEYS"


def has_torch_weights(path: Path) -> bool:
    """Whether ``path`` holds PyTorch weights (safetensors or ``pytorch_model*.bin``)."""
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


class ModelSpec(KilnModel):
    """One model directory to serve."""

    path: Path = Field(
        description="Directory written by save_pretrained (or holding model.onnx + tokenizer)."
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients pass as 'model'; defaults to the directory's name.",
    )
    kind: Literal["auto", "causal_lm", "encoder"] = Field(
        "auto",
        description="'auto' reads config.json: *ForCausalLM / *LMHeadModel -> causal_lm, "
        "anything else (or an ONNX file) -> encoder.",
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="Execution backend. 'onnx' runs the model in ONNX Runtime: model.onnx for "
        "encoders, model_kv.onnx (the KV-cache graph every ONNX variant of a causal LM ships; "
        "exported at load time from a Hugging Face directory) for causal LMs. 'auto' picks onnx "
        "for a directory holding an .onnx file and no torch weights, else torch.",
    )
    precision: Precision = Field(
        "auto", description="Weights precision; 'auto' picks bf16 only where it is fast."
    )
    adapter: Path | None = Field(
        None, description="PEFT adapter directory merged into a causal LM at load time."
    )
    version: str = Field("1", description="Version label of the model in metrics and /v1/models.")
    compile: bool = Field(
        False,
        description="Run the torch encoder through torch.compile (encoders only; off by "
        "default: the first batches of each new shape compile, see docs/BENCHMARKS.md).",
    )

    @property
    def served_name(self) -> str:
        """The name clients use: ``name`` or the directory's name."""
        return self.name or Path(self.path).resolve().name


class EmbeddingBatchConfig(KilnModel):
    """Dynamic batching of encoder requests (token budget, max wait, length buckets)."""

    max_batch_tokens: int = Field(
        2048,
        ge=1,
        description="Padded tokens per forward pass (batch size x bucket length). 2048 = 16 "
        "inputs of 128 tokens: on a CPU a bigger batch is no faster per input (MiniLM, 2 "
        "AVX2 cores: batch 16 at 128 tokens 36 sentences/s, batch 64 26; see "
        "docs/BENCHMARKS.md serve-embeddings) and only adds latency.",
    )
    max_batch_size: int = Field(64, ge=1, description="Most sequences in one forward pass.")
    max_wait_ms: float = Field(
        50.0, ge=0.0, description="Longest a queued input waits for its batch to fill."
    )
    buckets: list[int] = Field(
        default_factory=lambda: [16, 32, 64, 128, 256, 512],
        description="Length bucket limits: inputs are batched with others of the same bucket.",
    )

    @field_validator("buckets")
    @classmethod
    def _sorted_positive(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("buckets must be a non-empty list of positive lengths")
        return sorted(set(value))


class GenerationConfig(KilnModel):
    """Continuous-batching budgets of the generation engine."""

    max_num_seqs: int = Field(32, ge=1, description="Most sequences decoded together.")
    max_batched_tokens: int = Field(
        2048, ge=1, description="Most tokens per engine step (prompt tokens + 1 per decode)."
    )


class CacheConfig(KilnModel):
    """Response cache for deterministic requests (temperature 0, embeddings)."""

    enabled: bool = Field(True, description="Cache deterministic responses.")
    url: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="redis:// URL: use Redis instead of the in-process LRU.",
    )
    ttl_s: float = Field(3600.0, gt=0, description="Seconds a cached response stays valid.")
    max_entries: int = Field(4096, ge=1, description="Size of the in-process LRU cache.")


class ServeConfig(KilnModel):
    """A whole server process."""

    models: list[ModelSpec] = Field(min_length=1, description="Models to serve (one or more).")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"Accepted API keys (plus those in ${API_KEYS_ENV}); empty = no auth.",
    )
    admin_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"Keys of the /admin routes (plus ${ADMIN_KEYS_ENV}); empty = admin off.",
    )
    max_queued_requests: int = Field(
        256, ge=1, description="Admitted, unfinished requests per model before 429."
    )
    max_queued_tokens: int = Field(
        262_144, ge=1, description="Their tokens (prompt + max_tokens; inputs) before 429."
    )
    max_queue_wait_s: float | None = Field(
        None,
        gt=0,
        description="Most estimated queue wait (queued tokens / the model's measured service "
        "rate) before 429; None: min(5 s, request_timeout_s / 4), so admitted requests keep "
        "most of their deadline.",
    )
    reject_hold_s: float = Field(
        5.0,
        ge=0,
        description="Seconds an early 429 (queue already over, refused before parsing) is held "
        "before it is sent, at most max_queue_wait_s (a timer, no CPU; Retry-After is shortened "
        "by as much): clients that resend at once cannot turn refusals into a flood that "
        "starves the model (0: answer at once).",
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="Idle seconds a kept-alive connection stays open. Above clients' pool expiry "
        "(httpx 5 s, aiohttp 15 s; nginx keeps 75 s): a server that closes first races the "
        "client's next request on that connection (a transport error on the client).",
    )
    max_connections: int | None = Field(
        4096,
        ge=1,
        description="Concurrent connections + tasks uvicorn accepts (limit_concurrency); past "
        "it uvicorn answers 503 at once, before any parsing. None: unbounded.",
    )
    backlog: int = Field(2048, ge=1, description="Listen backlog: connections waiting to accept.")
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Largest request body (413).")
    max_input_tokens: int = Field(
        8192, ge=1, description="Longest prompt / embedding input in tokens (400)."
    )
    auto_truncate: bool = Field(
        False,
        description="Cut inputs longer than the model's limit instead of answering 400: "
        "embedding inputs to sentence-transformers max_seq_length (else model_max_length), "
        "completion prompts to their last tokens that fit the context minus max_tokens; a "
        "request's 'truncate' overrides it.",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Deadline of one request; past it the answer is 504."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, time in-flight requests get to finish."
    )
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads of torch and ONNX Runtime (None: their defaults)."
    )
    workers: int = Field(
        1, ge=1, le=64, description="Server processes sharing the port (see serve/workers.py)."
    )
    embedding: EmbeddingBatchConfig = Field(default_factory=EmbeddingBatchConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        names = [m.served_name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two models are served as {dupes[0]!r}; give each a distinct name")
        return self

    @property
    def queue_wait_s(self) -> float:
        """The queue-wait bound in force: ``max_queue_wait_s`` or its default from the deadline."""
        if self.max_queue_wait_s is not None:
            return self.max_queue_wait_s
        return min(5.0, self.request_timeout_s / 4)

    @property
    def queue_hold_s(self) -> float:
        """How long a 429 is held before it is sent: ``reject_hold_s``, at most the wait bound."""
        return min(self.reject_hold_s, self.queue_wait_s)

    def resolved_admin_keys(self) -> list[str]:
        """``admin_keys`` plus the comma-separated keys of ``$MODELKILN_ADMIN_KEYS``."""
        env = [k.strip() for k in os.environ.get(ADMIN_KEYS_ENV, "").split(",") if k.strip()]
        return [*(k.get_secret_value() for k in self.admin_keys), *env]

    def resolved_api_keys(self) -> list[str]:
        """``api_keys`` plus the comma-separated keys of ``$MODELKILN_API_KEYS``."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return [*(k.get_secret_value() for k in self.api_keys), *env]


def load_serve_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    named: dict[str, Any] | None = None,
) -> ServeConfig:
    """Load a :class:`ServeConfig` from YAML (optional) + ``a.b=value`` overrides + named flags.

    Raises:
        ConfigError: the file is missing or malformed, or a field is unknown or invalid.
    """
    return load_section(ServeConfig, path, overrides, named=named, label="serve config")
