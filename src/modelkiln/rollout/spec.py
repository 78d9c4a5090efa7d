"""A rollout's spec, its persisted state and its decisions (plain pydantic models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from modelkiln.configbase import KilnModel
from modelkiln.rollout.analysis import AnalysisConfig
from modelkiln.rollout.policy import CanaryConfig

Strategy = Literal["canary", "blue-green", "shadow"]
Status = Literal["running", "awaiting-promotion", "promoted", "rolled-back", "aborted"]
ACTIVE: tuple[Status, ...] = ("running", "awaiting-promotion")


class RolloutSpec(KilnModel):
    """What to roll out and how."""

    model: str = Field(description="Model name (as served and as in the registry).")
    baseline: str = Field(description="Version label now serving (e.g. '1').")
    candidate: str = Field(description="Version label being rolled out (e.g. '2').")
    strategy: Strategy = Field(default="canary", description="canary, blue-green or shadow.")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Ramp and thresholds.")
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig, description="The gates.")
    shadow_percent: float = Field(
        default=10.0, gt=0, le=100, description="Traffic mirrored in shadow / blue-green preview."
    )
    on_restart: Literal["resume", "revert"] = Field(
        default="resume", description="After a restart: continue, or roll back to the baseline."
    )


class RolloutState(KilnModel):
    """Everything needed to resume a rollout after a restart (written atomically)."""

    spec: RolloutSpec
    status: Status = "running"
    stage: int = Field(default=0, description="Index of the current stage.")
    started: float = Field(description="Clock time the rollout started.")
    stage_started: float = Field(description="Clock time the current stage started.")
    last_check: float = Field(description="Clock time of the last check.")
    last_analysis: float = Field(
        default=0.0, description="Clock time the sequential tests were last updated."
    )
    stage_requests: int = Field(default=0, description="Candidate requests seen in this stage.")
    tests: dict[str, list[float]] = Field(default_factory=dict, description="log LR per test.")
    window: list[dict[str, float]] = Field(
        default_factory=list, description="The last checks' figures (absolute gates)."
    )
    reason: str = Field(default="", description="Why it is in its status.")
    checks: int = Field(default=0, description="Checks run so far.")


class Decision(KilnModel):
    """One controller decision, with its numbers and reason (a line of the JSONL log)."""

    time: float = Field(description="Clock time.")
    model: str
    baseline: str
    candidate: str
    stage: int
    weight: float = Field(description="Candidate traffic percent after the decision.")
    action: Literal["start", "advance", "hold", "promote", "rollback", "abort", "check"]
    reason: str
    numbers: dict[str, Any] = Field(default_factory=dict)
