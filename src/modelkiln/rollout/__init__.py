"""Model registry and progressive delivery (blue-green, canary, shadow) with SLO gates.

Parts, kept apart as in Argo Rollouts:

- :mod:`.registry` — immutable, hashed model versions with SQLite metadata;
  :func:`resolve_model_uri` turns ``registry://NAME@production`` into a verified path.
- :mod:`.policy` — *what* to do: traffic policies and the canary ramp (pure).
- :mod:`.analysis` — *how to judge*: SLO gates with sequential tests (pure).
- :mod:`.controller` — runs a rollout under a clock: promote, hold or roll back.
- :mod:`.k8s` — the same policy as Argo Rollouts ``Rollout`` + ``AnalysisTemplate``.
"""

from __future__ import annotations

from modelkiln.rollout.registry import ModelVersion, Registry, default_registry_dir
from modelkiln.rollout.uri import resolve_model_uri

__all__ = ["ModelVersion", "Registry", "default_registry_dir", "resolve_model_uri"]
