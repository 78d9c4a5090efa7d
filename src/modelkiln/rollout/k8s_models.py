"""Typed models of the Argo Rollouts resources ``kiln rollout export`` writes (the fields used).

Field names follow the CRDs (camelCase through aliases); dumped with
``by_alias=True, exclude_none=True`` they are the manifests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _K8s(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ObjectMeta(_K8s):
    """metadata."""

    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class Arg(_K8s):
    """An analysis argument (a value, or from the pod template hash)."""

    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = Field(default=None, alias="valueFrom")


class PrometheusProvider(_K8s):
    """provider.prometheus."""

    address: str
    query: str


class Metric(_K8s):
    """One AnalysisTemplate metric."""

    name: str
    interval: str
    success_condition: str = Field(alias="successCondition")
    failure_limit: int = Field(alias="failureLimit")
    provider: dict[str, PrometheusProvider]


class AnalysisTemplateSpec(_K8s):
    """spec of an AnalysisTemplate."""

    args: list[Arg]
    metrics: list[Metric]


class AnalysisTemplate(_K8s):
    """argoproj.io/v1alpha1 AnalysisTemplate."""

    api_version: str = Field(default="argoproj.io/v1alpha1", alias="apiVersion")
    kind: str = "AnalysisTemplate"
    metadata: ObjectMeta
    spec: AnalysisTemplateSpec


class CanaryStep(_K8s):
    """One canary step: set a weight, or pause."""

    set_weight: int | None = Field(default=None, alias="setWeight")
    pause: dict[str, str] | None = None


class RolloutAnalysis(_K8s):
    """strategy.canary.analysis (background analysis for the whole canary)."""

    templates: list[dict[str, str]]
    args: list[Arg]
    starting_step: int | None = Field(default=None, alias="startingStep")


class CanaryStrategy(_K8s):
    """strategy.canary."""

    steps: list[CanaryStep]
    analysis: RolloutAnalysis


class RolloutSpec(_K8s):
    """spec of a Rollout."""

    replicas: int
    revision_history_limit: int = Field(alias="revisionHistoryLimit")
    selector: dict[str, dict[str, str]]
    template: dict[str, Any]
    strategy: dict[str, CanaryStrategy]


class Rollout(_K8s):
    """argoproj.io/v1alpha1 Rollout."""

    api_version: str = Field(default="argoproj.io/v1alpha1", alias="apiVersion")
    kind: str = "Rollout"
    metadata: ObjectMeta
    spec: RolloutSpec
