"""The contract between the model server and its plug-ins (monitoring, security, rollouts).

The server (:mod:`modelkiln.serve`) owns the request path; a plug-in never edits
its routes. It hands the server a :class:`ServeHooks`:

- :class:`RequestObserver` s get one :class:`RequestRecord` per finished
  request, on a background thread (never on the request path);
- one :class:`Authenticator` turns a request into a :class:`Principal`
  (default: the server's API-key check);
- :class:`RequestGuard` s admit or refuse a model request once its model and
  token count are known (scopes, model allowlists, per-key limits);
- extra routers, Prometheus collectors, checks run on every model directory
  before it loads, and extra uvicorn options (TLS).

A plug-in raises :class:`RequestRejected` to refuse a request; the server
renders it in the OpenAI error shape. :class:`ServeExtension` adds command-line
flags to ``kiln serve`` and builds the hooks from them. This module is core:
torch-free and FastAPI-free, so every package may import it.

Example:
    >>> class Count:
    ...     def __init__(self): self.n = 0
    ...     def observe(self, record: RequestRecord) -> None: self.n += 1
    >>> app = create_app(cfg, hooks=ServeHooks(observers=[Count()]))
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from modelkiln.errors import ServingError

if TYPE_CHECKING:
    import argparse

__all__ = [
    "SERVE_EXTENSIONS",
    "Authenticator",
    "OutputRecord",
    "Principal",
    "RequestGuard",
    "RequestObserver",
    "RequestRecord",
    "RequestRejected",
    "ServeExtension",
    "ServeHooks",
    "error_body",
    "error_type",
    "load_extensions",
    "merge_hooks",
]

#: The extensions of ``kiln serve`` and ``python -m modelkiln.serve``, as
#: ``"module:attribute"`` (an extension object, or a class built without arguments).
#: Named, never imported here, like the stage registry: add one line per package.
SERVE_EXTENSIONS: list[str] = [
    "modelkiln.security.extension:SecurityExtension",
    "modelkiln.rollout.extension:RegistryExtension",
    "modelkiln.monitor.serving:MonitorExtension",
]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` as the OpenAI API writes it (the one error shape of the server)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One choice (causal LM) or one embedding (encoder) of a finished request."""

    index: int
    tokens: int = 0  # completion tokens of this choice (0 for an embedding)
    finish_reason: str | None = None
    # Mean log-probability of the generated tokens under the model's untempered
    # distribution, and mean entropy (nats) of those distributions: set only for the
    # requests ``ServeHooks.sample_logprobs`` picked (they cost a log-softmax per step).
    mean_logprob: float | None = None
    mean_entropy: float | None = None
    embedding: Any = None  # float32 numpy vector, L2-normalized, full width (encoders)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the server knows about one finished request on a model or admin route."""

    route: str  # the path, e.g. /v1/completions
    method: str
    status: int  # final HTTP status; 499 when the client went away
    latency_s: float  # request start to last body byte (a stream's end)
    time: float  # unix time at the end
    model: str = ""  # served name; "" when no model was resolved
    version: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    input_bytes: int = 0  # UTF-8 bytes of the text inputs (0 for token-id inputs)
    stream: bool = False
    cached: bool = False  # answered from the response cache
    principal: str | None = None  # Principal.subject of the caller; None when auth is off
    prompt_ids: tuple[Sequence[int], ...] = ()  # per prompt / input; shared, do not mutate
    outputs: tuple[OutputRecord, ...] = ()


@runtime_checkable
class RequestObserver(Protocol):
    """Gets every finished request, on the server's observer thread.

    Optional members, looked up with ``getattr``: ``wants_logprobs: bool`` (the
    engine then computes :attr:`OutputRecord.mean_logprob` / ``mean_entropy``),
    ``logprob_sample_rate: float`` (only for that share of the requests, drawn per
    request; default 1.0) and ``close()`` (called once when the server shuts down).
    """

    def observe(self, record: RequestRecord) -> None:
        """Take one record; exceptions are logged and counted, never seen by clients."""


class RequestRejected(ServingError):
    """A request refused with an HTTP status, rendered in the OpenAI error shape.

    Args:
        status: HTTP status code (401 unauthenticated, 403 forbidden, 429 over a limit ...).
        message: what went wrong, naming the bad value.
        code: machine-readable reason (``invalid_api_key``, ``model_not_allowed`` ...).
        param: the request field at fault, if any.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``, ``x-ratelimit-*``).
        reason: label of ``ml_rejections_total`` (defaults to ``code``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.reason = reason or code or f"http_{status}"

    @property
    def type(self) -> str:
        """The OpenAI error type of the status."""
        return error_type(self.status)

    def body(self) -> dict[str, Any]:
        """The JSON body in the OpenAI error shape."""
        return error_body(self.message, self.type, self.param, self.code)


class Principal(Protocol):
    """Who is calling; only ``subject`` is required (scopes etc. are the plug-in's)."""

    @property
    def subject(self) -> str:
        """Who, as written to logs and :attr:`RequestRecord.principal`."""
        ...


class Authenticator(Protocol):
    """Turns a request into a :class:`Principal` or raises :class:`RequestRejected`.

    Called for every HTTP request except ``/health`` and ``/ready``; the principal
    is stored in ``request.state.principal``. With a plugged authenticator, the
    ``/admin`` routes require ``"admin"`` in the principal's ``scopes``.
    """

    def authenticate(self, request: Any) -> Principal:
        """The caller of ``request`` (a ``starlette.requests.Request``)."""
        ...


class RequestGuard(Protocol):
    """Admits a model request once its model and token count are known, before queueing."""

    def admit(
        self, principal: Principal | None, model: str, route: str, tokens: int
    ) -> Mapping[str, str] | None:
        """Raise :class:`RequestRejected` to refuse; return headers to add to the response.

        ``tokens``: prompt tokens plus the most completion tokens asked for (times ``n``).
        """
        ...


@dataclass
class ServeHooks:
    """Everything a plug-in adds to one server."""

    observers: list[RequestObserver] = field(default_factory=list)
    authenticator: Authenticator | None = None
    guards: list[RequestGuard] = field(default_factory=list)
    routers: list[Any] = field(default_factory=list)  # fastapi.APIRouter s, mounted as they are
    collectors: list[Any] = field(default_factory=list)  # prometheus_client collectors
    # Called with every model directory and runtime adapter directory before it loads;
    # raising a KilnError refuses it.
    model_checks: list[Callable[[Path], None]] = field(default_factory=list)
    uvicorn_options: dict[str, Any] = field(default_factory=dict)  # e.g. ssl_certfile
    # Loads the torch model (an ``nn.Module``, fp32) of a model directory the default
    # loader cannot read (e.g. encrypted weights, decrypted in memory); returns None to
    # leave the directory to the default loader. Torch backends only.
    model_loader: Callable[[Path], Any] | None = None
    # Opens the ONNX Runtime session of a model directory the default reader cannot read
    # (e.g. an encrypted graph, decrypted in memory), called with the directory and the
    # intra-op thread count; returns an ``onnxruntime.InferenceSession``, or None to leave
    # the directory to the default reader. Not asked when the model's backend is torch.
    onnx_loader: Callable[[Path, int | None], Any] | None = None
    # Log-prob sampling is decided per time slot of this many seconds (0: per request):
    # requests scored together share decode steps, and a step with no scored row pays
    # nothing, so a sampled share costs about that share of the scoring.
    logprob_slot_s: float = 1.0
    _slot: int = field(default=-1, init=False, repr=False, compare=False)
    _slot_on: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def wants_logprobs(self) -> bool:
        """Whether an observer wants token log-probabilities computed."""
        return any(getattr(o, "wants_logprobs", False) for o in self.observers)

    @property
    def logprob_rate(self) -> float:
        """The share of generation requests to score (the largest share an observer asks)."""
        rates = [float(getattr(o, "logprob_sample_rate", 1.0))
                 for o in self.observers if getattr(o, "wants_logprobs", False)]  # fmt: skip
        return max(rates, default=0.0)

    def sample_logprobs(self) -> bool:
        """Whether the engine scores this request's tokens (a share :attr:`logprob_rate`).

        Scoring costs a log-softmax per generated token on the engine thread, so
        observers that can work from a sample ask for a share of the requests only.
        Each time slot (:attr:`logprob_slot_s`) is scored with probability
        ``logprob_rate``, drawn when the slot starts: every request is sampled with that
        probability whatever its content, and the scored ones run in the same steps.
        Called on the event loop's thread only.
        """
        rate = self.logprob_rate
        if rate >= 1.0 or rate <= 0.0:
            return rate >= 1.0
        if self.logprob_slot_s <= 0:
            return random.random() < rate
        slot = int(time.monotonic() // self.logprob_slot_s)
        if slot != self._slot:
            self._slot, self._slot_on = slot, random.random() < rate
        return self._slot_on


class ServeExtension(Protocol):
    """A plug-in of ``kiln serve``: its flags, and the hooks they ask for.

    Optional, looked up with ``getattr``: ``model_spec(path: str) -> dict | None``,
    asked for every ``--model-path``; a dict of ``ModelSpec`` fields replaces the plain
    path (e.g. ``registry://NAME@production`` -> the verified folder, name and version).
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this extension's flags to the server's one argument parser."""

    def hooks(self, args: argparse.Namespace, cfg: Any) -> ServeHooks | None:
        """The hooks for these arguments and the resolved ``ServeConfig`` (None: nothing).

        Raises:
            KilnError: a flag is invalid (the command exits 2 with the message).
        """
        ...


def merge_hooks(*parts: ServeHooks | None) -> ServeHooks:
    """One :class:`ServeHooks` holding everything ``parts`` hold.

    Raises:
        ServingError: more than one part brings an authenticator.
    """
    merged = ServeHooks()
    for part in parts:
        if part is None:
            continue
        if part.authenticator is not None:
            if merged.authenticator is not None:
                raise ServingError(
                    "two extensions each plug in an authenticator",
                    hint="enable one authentication extension (keys or JWT), not both",
                )
            merged.authenticator = part.authenticator
        if part.model_loader is not None:
            if merged.model_loader is not None:
                raise ServingError(
                    "two extensions each plug in a model loader",
                    hint="enable one extension that loads weights",
                )
            merged.model_loader = part.model_loader
        if part.onnx_loader is not None:
            if merged.onnx_loader is not None:
                raise ServingError(
                    "two extensions each plug in an ONNX session loader",
                    hint="enable one extension that loads weights",
                )
            merged.onnx_loader = part.onnx_loader
        merged.observers += part.observers
        merged.guards += part.guards
        merged.routers += part.routers
        merged.collectors += part.collectors
        merged.model_checks += part.model_checks
        merged.uvicorn_options |= part.uvicorn_options
    return merged


def load_extensions(names: Sequence[str]) -> list[ServeExtension]:
    """Import the extensions ``names`` (``"module:attribute"``) name.

    Raises:
        ConfigError: a name is malformed or does not resolve.
    """
    import importlib

    from modelkiln.errors import ConfigError

    out: list[ServeExtension] = []
    for name in names:
        module, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(
                f"cannot load the server extension {name!r}: {exc}",
                hint="fix SERVE_EXTENSIONS in modelkiln.contract.serving ('module:attribute')",
            ) from exc
        out.append(found() if isinstance(found, type) else found)
    return out
