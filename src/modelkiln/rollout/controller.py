"""The rollout controller: pure logic under a clock (fake in tests, monotonic in servers).

At each check it drains one interval of both versions' figures, feeds the
sequential tests (:mod:`.analysis`) and decides: advance, promote, hold or roll
back. Every decision is logged with its numbers and reason; the state is saved
after every change, and traffic policies are *derived* from the saved state
(:func:`.stages.policy_for`), so a restart either resumes the saved stage or
reverts to the baseline, never a half-applied split.

Example (tests drive it like the generation scheduler, with a fake clock):
    >>> clock, rec = FakeClock(), Recorder()
    >>> ctl = Controller(StateStore(tmp), clock, rec)
    >>> ctl.start(RolloutSpec(model="m", baseline="1", candidate="2"))
    >>> clock.advance(30); ctl.tick()
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from modelkiln.contract.audit import AuditWriter
from modelkiln.errors import ConfigError
from modelkiln.rollout import analysis
from modelkiln.rollout.figures import Interval, decisive, evidence, figures, numbers_of
from modelkiln.rollout.policy import TrafficPolicy
from modelkiln.rollout.recorder import MetricsSource
from modelkiln.rollout.spec import ACTIVE, Decision, RolloutSpec, RolloutState
from modelkiln.rollout.stages import candidate_weight, n_stages, policy_for
from modelkiln.rollout.state import StateStore


class Clock(Protocol):
    """A monotonic source of seconds (``modelkiln.serve.clock`` has a real and a fake one;
    declared here as a protocol so this package does not import the serve stage)."""

    def now(self) -> float:
        """The current time."""
        ...


ApplyFn = Callable[[str, TrafficPolicy], None]
FinishFn = Callable[[RolloutState], None]
DriftProbe = Callable[[str, str], list[str] | None]
"""``(model, version) -> drifted features`` (``[]``: checked, none; None: no information),
e.g. :class:`.drift.HttpDriftProbe`."""


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run under the controller's lock: the check thread and admin calls never interleave
    a load-modify-save of the same state."""

    @functools.wraps(method)
    def wrapper(self: Controller, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Controller:
    """Runs every model's rollout: start, tick (checks), promote, rollback, abort, resume."""

    def __init__(
        self,
        store: StateStore,
        clock: Clock,
        source: MetricsSource,
        *,
        apply: ApplyFn | None = None,
        on_finish: FinishFn | None = None,
        drift: DriftProbe | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.source = source
        self.apply = apply or (lambda _m, _p: None)
        self.on_finish = on_finish or (lambda _s: None)
        self.drift = drift
        self.audit = audit
        self._actor: str | None = None  # who runs the current command (None: the controller)
        self._lock = threading.RLock()
        self._interval: dict[str, Interval] = {}  # this check interval's figures, per model

    # -- commands ------------------------------------------------------------
    @property
    def actor(self) -> str:
        """Who runs the current command ("controller" outside :meth:`acting`)."""
        return self._actor or "controller"

    @contextlib.contextmanager
    def acting(self, actor: str) -> Iterator[None]:
        """Commands run inside are audited as ``rollout.action`` by ``actor`` (an operator),
        not as the controller's own ``rollout.decision``."""
        with self._lock:
            before, self._actor = self._actor, actor
            try:
                yield
            finally:
                self._actor = before

    @_locked
    def start(self, spec: RolloutSpec) -> RolloutState:
        """Start a rollout; refuse while another rollout of the same model is active.

        Raises:
            ConfigError: a rollout of ``spec.model`` is running, or baseline == candidate.
        """
        if spec.baseline == spec.candidate:
            raise ConfigError(
                f"{spec.model}: candidate {spec.candidate!r} is the baseline",
                hint="roll out a different version than the one serving",
            )
        with self.store.lock(spec.model):
            old = self.store.load(spec.model)
            if old is not None and old.status in ACTIVE:
                raise ConfigError(
                    f"a rollout of {spec.model!r} is already {old.status} "
                    f"({old.spec.baseline} -> {old.spec.candidate}, {old.spec.strategy})",
                    hint=f"finish it first: kiln rollout promote|rollback|abort {spec.model}",
                )
            now = self.clock.now()
            state = RolloutState(
                spec=spec, started=now, stage_started=now, last_check=now, last_analysis=now
            )
            self._interval.pop(spec.model, None)
            state.tests = {k: t.log_lr for k, t in analysis.new_tests(spec.analysis).items()}
            for v in (spec.baseline, spec.candidate):
                self.source.drain(spec.model, v)  # figures before the start do not count
            self.source.drain_pairs(spec.model)
            self._commit(state, "start", f"{spec.strategy} rollout started")
        return state

    @_locked
    def promote(self, model: str, reason: str = "promoted by an operator") -> RolloutState:
        """Finish now with the candidate at 100 %."""
        return self._finish(self._active(model), "promoted", "promote", reason)

    @_locked
    def rollback(self, model: str, reason: str = "rolled back by an operator") -> RolloutState:
        """Finish now with the baseline at 100 %."""
        return self._finish(self._active(model), "rolled-back", "rollback", reason)

    @_locked
    def abort(self, model: str, reason: str = "aborted by an operator") -> RolloutState:
        """Stop the rollout; traffic goes back to the baseline."""
        return self._finish(self._active(model), "aborted", "abort", reason)

    def status(self, model: str) -> RolloutState | None:
        """The model's last rollout state (active or finished)."""
        return self.store.load(model)

    @_locked
    def snapshot(self, model: str, decisions: int) -> tuple[RolloutState | None, list[Decision]]:
        """The state and its last decisions, read together (never between a save and its log)."""
        return self.store.load(model), self.store.decisions(model)[-decisions:] if decisions else []

    def policy(self, model: str) -> TrafficPolicy | None:
        """The traffic policy of the model's last rollout (None: no rollout yet)."""
        state = self.store.load(model)
        return policy_for(state) if state else None

    @_locked
    def resume(self) -> list[RolloutState]:
        """After a restart: re-apply every active rollout's policy, or revert it (on_restart)."""
        out = []
        for state in self.store.active():
            if state.spec.on_restart == "revert":
                state = self._finish(state, "rolled-back", "rollback", "reverted after a restart")
            else:
                # The interrupted interval's figures are gone; the tests keep their evidence
                # and their copies (the copy schedule counts from the resumed stage start).
                state.last_check = state.stage_started = self.clock.now()
                state.last_analysis = state.last_check
                self._commit(state, "check", f"resumed at stage {state.stage} after a restart")
            out.append(state)
        return out

    # -- checks ------------------------------------------------------------
    @_locked
    def tick(self) -> list[Decision]:
        """Update the tests of every running rollout and run the checks that are due (or that
        a test forces by crossing its bound); return the decisions taken."""
        decisions = []
        now = self.clock.now()
        for state in self.store.active():
            acc = self._interval.get(state.spec.model)
            live = (
                acc is not None
                and acc.tests is not None
                and acc.key == (state.started, state.stage)
            )  # the saved state lags the tests between checks
            last = acc.last_analysis if live and acc is not None else state.last_analysis
            due = now - last >= state.spec.canary.analysis_interval_s
            if state.status == "running" and due:
                decision = self._analyse(state)
                if decision is not None:
                    decisions.append(decision)
        return decisions

    def _analyse(self, state: RolloutState) -> Decision | None:
        """Feed both versions' figures since the last update to the sequential tests.

        The tests are always valid, however often they are updated, so they are updated
        every ``analysis_interval_s`` and a rollback does not wait for the next check; the
        window gates, the dwell time and drift are judged at the checks.
        """
        spec = state.spec
        acc = self._interval.get(spec.model)
        if acc is None or acc.key != (state.started, state.stage):
            acc = self._interval[spec.model] = Interval((state.started, state.stage))
        elif acc.tests is not None:  # newer than the saved state: tests live in memory
            state.tests, state.stage_requests = acc.tests, acc.stage_requests
            state.last_analysis = acc.last_analysis
        cand = self.source.drain(spec.model, spec.candidate)
        base = self.source.drain(spec.model, spec.baseline)
        pairs = self.source.drain_pairs(spec.model)
        for window, arm in ((acc.cand, cand), (acc.base, base), (acc.batch_cand, cand),
                            (acc.batch_base, base)):  # fmt: skip
            window.merge(arm)
        acc.pairs += pairs
        acc.batch_pairs += pairs
        state.stage_requests += cand.requests
        tests = self._tests_of(state)
        due = self.clock.now() - state.last_check >= spec.canary.check_interval_s
        if acc.batch_ready(due):
            slo = (spec.canary.max_error_rate, spec.canary.max_latency_ms)
            mirrored = spec.strategy != "canary"  # one arm is shadow traffic: see update_tests
            batch = (acc.batch_cand, acc.batch_base)
            analysis.update_tests(tests, spec.analysis, slo, batch, acc.batch_pairs, not mirrored)
            acc.new_batch()
        state.tests = {k: t.log_lr for k, t in tests.items()}
        state.last_analysis = self.clock.now()
        failing = analysis.failing_tests(tests, spec.analysis, n_stages(spec))
        if due or decisive(state, failing, acc):
            return self._check(state, tests, failing)
        # Saved at the next check (a file write per update would cost more than the update).
        acc.tests, acc.stage_requests = state.tests, state.stage_requests
        acc.last_analysis = state.last_analysis
        return None

    def _tests_of(self, state: RolloutState) -> dict[str, analysis.SequentialTest]:
        """The state's tests, with the copies due by now started (fixed times in the stage,
        never chosen from the data: see :mod:`.analysis`)."""
        cfg = state.spec.analysis
        copies = analysis.planned_copies(cfg, state.spec.canary.dwell_s)
        due = analysis.copies_due(cfg, self.clock.now() - state.stage_started)
        tests = {
            k: analysis.SequentialTest(list(cfg.ratios), list(v), copies)
            for k, v in state.tests.items()
        }
        for test in tests.values():
            test.start_copies(due)
        return tests

    def _check(
        self, state: RolloutState, tests: dict[str, analysis.SequentialTest], failing: list[str]
    ) -> Decision:
        spec = state.spec
        acc = self._interval.setdefault(spec.model, Interval((state.started, state.stage)))
        state.last_check = self.clock.now()
        state.checks += 1
        current = figures(acc.cand, acc.base, acc.pairs)
        acc.new_check()
        state.window = ([*state.window, current])[-spec.canary.window :]
        numbers = numbers_of(state, tests)
        action, reason = self._judge(state, failing, numbers)
        if action == "rollback":
            self._finish(state, "rolled-back", "rollback", reason, numbers)
        elif action == "advance":
            self._advance(state, reason, numbers)
        else:
            self._commit(state, "hold", reason, numbers)
        return self.store.decisions(spec.model)[-1]

    def _judge(
        self, state: RolloutState, failing: list[str], numbers: dict[str, Any]
    ) -> tuple[str, str]:
        spec, means = state.spec, numbers["window_mean"]
        absolute = [f for f in failing if f.startswith("slo_")]
        relative = [f for f in failing if not f.startswith("slo_")]
        if relative:
            return "rollback", "candidate worse than the baseline: " + evidence(relative, numbers)
        base_over = (
            means["base_error_rate"] > spec.canary.max_error_rate
            or means["base_p95_ms"] > spec.canary.max_latency_ms
        )
        if absolute and not base_over:
            return "rollback", "candidate over its SLO: " + evidence(absolute, numbers)
        if absolute:
            return "hold", "both versions over the SLO (environment, not the candidate)"
        drift = self._drift(spec, numbers)
        if drift:
            return ("rollback" if spec.analysis.drift_action == "rollback" else "hold"), drift
        over = (
            means["cand_error_rate"] > spec.canary.max_error_rate
            or means["cand_p95_ms"] > spec.canary.max_latency_ms
        )
        waited = self.clock.now() - state.stage_started >= spec.canary.dwell_s
        enough = state.stage_requests >= spec.canary.min_requests
        if waited and enough and not over:
            return "advance", f"stage {state.stage} passed its {spec.canary.dwell_s:g} s"
        why = "window mean over a threshold" if over else "dwell time not over"
        if waited and not enough:
            why = f"{state.stage_requests} < {spec.canary.min_requests} candidate requests"
        return "hold", why

    def _drift(self, spec: RolloutSpec, numbers: dict[str, Any]) -> str:
        """Why drift stops the ramp ('' when it does not): the candidate drifts while the
        baseline, on the same traffic, does not. Both drifting is a shift of the inputs, not
        the candidate's doing: noted in the numbers, no action."""
        if self.drift is None:
            return ""
        cand, base = self.drift(spec.model, spec.candidate), self.drift(spec.model, spec.baseline)
        numbers["drift"] = {"candidate": cand, "baseline": base}
        if not cand or base:
            return ""
        other = "no drift information" if base is None else "no drift"
        return (
            f"monitoring reports drift on the candidate {spec.candidate} "
            f"({', '.join(cand)}); baseline {spec.baseline}: {other}"
        )

    def _advance(self, state: RolloutState, reason: str, numbers: dict[str, Any]) -> None:
        spec = state.spec
        if state.stage + 1 >= n_stages(spec):
            if spec.strategy == "shadow":
                state.status = "awaiting-promotion"
                self._commit(state, "hold", reason + "; awaiting a manual promotion", numbers)
                return
            self._finish(state, "promoted", "promote", reason, numbers)
            return
        state.stage += 1
        state.stage_started = self.clock.now()
        state.stage_requests = 0
        state.window = []
        self._interval.pop(spec.model, None)
        state.tests = {k: t.log_lr for k, t in analysis.new_tests(spec.analysis).items()}
        self._commit(state, "advance", reason, numbers)

    # -- state changes ---------------------------------------------------------
    def _active(self, model: str) -> RolloutState:
        state = self.store.load(model)
        if state is None or state.status not in ACTIVE:
            raise ConfigError(
                f"no active rollout of {model!r}"
                + (f" (the last one was {state.status})" if state else ""),
                hint=f"start one: kiln rollout start {model}@VERSION",
            )
        return state

    def _finish(
        self,
        state: RolloutState,
        status: str,
        action: str,
        reason: str,
        numbers: dict[str, Any] | None = None,
    ) -> RolloutState:
        state.status = status  # type: ignore[assignment]
        self._commit(state, action, reason, numbers or {})
        self.on_finish(state)
        return state

    def _commit(
        self, state: RolloutState, action: str, reason: str, numbers: dict[str, Any] | None = None
    ) -> None:
        """Save the state, apply its policy, log the decision (in that order)."""
        state.reason = reason
        self.store.save(state)
        self.apply(state.spec.model, policy_for(state))
        spec = state.spec
        self.store.log(
            Decision(
                time=self.clock.now(), model=spec.model, baseline=spec.baseline,
                candidate=spec.candidate, stage=state.stage, weight=candidate_weight(state),
                action=action, reason=reason, numbers=numbers or {},
            )
        )  # fmt: skip
        if self.audit is not None:
            event = "rollout.action" if self._actor else "rollout.decision"
            self.audit.write(
                event, actor=self._actor or "controller", rollout=spec.model,
                baseline=spec.baseline, version=spec.candidate, strategy=spec.strategy,
                action=action, stage=state.stage, weight=candidate_weight(state),
                status=state.status, reason=reason, numbers=numbers or {},
            )  # fmt: skip
