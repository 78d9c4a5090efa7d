"""The stages of each strategy and the traffic policy of a rollout state (pure)."""

from __future__ import annotations

from modelkiln.rollout.policy import TrafficPolicy, make_policy, single, split
from modelkiln.rollout.spec import RolloutSpec, RolloutState


def n_stages(spec: RolloutSpec) -> int:
    """How many analysed stages the strategy has before it is done.

    canary: every step below 100 % (reaching 100 % is the promotion);
    blue-green: preview (candidate mirrored) then post-switch (baseline mirrored);
    shadow: one mirrored stage, then it waits for a manual promotion.
    """
    if spec.strategy == "canary":
        return len([s for s in spec.canary.steps if s < 100])
    return 2 if spec.strategy == "blue-green" else 1


def candidate_weight(state: RolloutState) -> float:
    """Percent of user traffic the candidate serves in this state."""
    spec = state.spec
    if state.status == "promoted":
        return 100.0
    if state.status in ("rolled-back", "aborted"):
        return 0.0
    if spec.strategy == "canary":
        return float(spec.canary.steps[state.stage])
    return 100.0 if spec.strategy == "blue-green" and state.stage == 1 else 0.0


def policy_for(state: RolloutState) -> TrafficPolicy:
    """The traffic policy a state implies (derived, never stored: it cannot be half-applied)."""
    spec = state.spec
    base, cand = spec.baseline, spec.candidate
    if state.status == "promoted":
        return single(cand)
    if state.status in ("rolled-back", "aborted"):
        return single(base)
    if spec.strategy == "canary":
        return split(
            base, cand, spec.canary.steps[state.stage], mirror_percent=spec.canary.mirror_percent
        )
    if spec.strategy == "blue-green" and state.stage == 1:
        # After the switch the old version keeps getting a mirrored share, so the
        # comparison still runs against a baseline at the same time.
        return make_policy(weights={cand: 100}, shadow=base, shadow_percent=spec.shadow_percent)
    return make_policy(weights={base: 100}, shadow=cand, shadow_percent=spec.shadow_percent)
