"""Generation serving: continuous-batching engine for causal LMs.

Three layers, each testable alone: :mod:`.scheduler` (pure logic, fake clock),
:mod:`.backend` (the torch model runner with a shared KV cache) and
:mod:`.engine` (the asyncio step loop the HTTP layer talks to through the
contract in :mod:`.api`); :mod:`.sampling` picks tokens and turns them into
text; :mod:`.runs` turns one OpenAI request into engine requests and merges
their event streams. Importing this package does not import torch.

Example:
    >>> from modelkiln.serve.generation import ContinuousBatchingEngine
    >>> engine = ContinuousBatchingEngine.from_path("runs/x/train/model", max_num_seqs=32)
"""

from __future__ import annotations

from modelkiln.serve.generation.api import (
    FinishReason,
    GenerationEngine,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from modelkiln.serve.generation.backend import TorchCausalLMBackend
from modelkiln.serve.generation.engine import ContinuousBatchingEngine
from modelkiln.serve.generation.scheduler import (
    DEADLINE_EXCEEDED,
    FakeClock,
    MonotonicClock,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

__all__ = [
    "DEADLINE_EXCEEDED",
    "ContinuousBatchingEngine",
    "FakeClock",
    "FinishReason",
    "GenerationEngine",
    "GenerationRequest",
    "MonotonicClock",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "TokenEvent",
    "TorchCausalLMBackend",
]
