"""The online drift monitor: sliding windows per model/version/feature, tested off the request path.

:class:`DriftMonitor` is a ``RequestObserver`` (see :mod:`modelkiln.contract.serving`):
the server hands it every finished request on its observer thread; ``observe``
turns the record into features and appends them to fixed-memory windows
(O(tokens), no test). A background thread started by :meth:`start` tests the
windows against the model's reference profile every ``check_every_requests``
requests or ``check_every_seconds`` seconds, with thresholds calibrated to
``false_alarm_rate`` false alarms per request (:mod:`.calibration`), plus the
handbook's live-vs-live confidence degradation (:mod:`.rolling`). The last
results are exported through :meth:`snapshot` (JSON) and :class:`DriftCollector`
(Prometheus gauges). Log-prob features come from the share of requests the
server scores (``logprob_sample_rate``): scoring costs engine time per token.

Example::

    mon = DriftMonitor({"lm": load_profile(model_dir / PROFILE_DIR)}, MonitorConfig())
    mon.start()
    mon.observe(record)          # from the server's observer thread
    mon.snapshot()["models"][0]["features"]
    mon.stop()
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modelkiln.monitor.calibration import calibrate_distance, per_test_alpha
from modelkiln.monitor.features import featurizer_for, record_features
from modelkiln.monitor.profile import Profile
from modelkiln.monitor.rolling import (
    ROLLING_FEATURE,
    ROLLING_TEST,
    RollingConfidence,
    confidence_source,
)
from modelkiln.monitor.stattests import StatTest, get_stattest
from modelkiln.monitor.stattests.mmd import mmd_pvalue
from modelkiln.monitor.tracks import FeatureState, ModelTrack, category_codes

log = logging.getLogger("modelkiln.monitor")


class MonitorConfig(BaseModel):
    """How the online monitor windows, tests and calibrates."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(500, ge=20, description="values per scalar feature in a window")
    embedding_window: int = Field(200, ge=20, description="vectors per embedding window")
    check_every_requests: int = Field(250, ge=1, description="test after this many requests")
    check_every_seconds: float = Field(30.0, gt=0, description="or after this many seconds")
    false_alarm_rate: float = Field(
        1e-4, gt=0, lt=1, description="target false alarms per request without drift"
    )
    tests: dict[str, str] = Field(
        default_factory=dict, description="feature -> drift test, overriding the profile's"
    )
    seed: int = Field(0, description="seed of the calibration simulations")
    feature_log: Path | None = Field(
        None, description="append each request's features to this JSONL (for kiln monitor report)"
    )
    log_prompt_ids: bool = Field(
        False, description="also log prompt token ids (off: prompts are never logged)"
    )
    logprob_sample_rate: float = Field(
        0.1,
        gt=0,
        le=1,
        description="share of generation requests whose tokens are scored for the log-prob "
        "features (drawn per request; scoring costs a log-softmax per token on the engine)",
    )
    confidence_window: int = Field(
        500,
        ge=20,
        description="rolling confidence check: the last N confidences vs the N before "
        "(the handbook's 500)",
    )


Listener = Callable[[list[FeatureState]], None]


class DriftMonitor:
    """Windows, background checks and exported state for every served model."""

    def __init__(
        self,
        profiles: dict[str, Profile],
        config: MonitorConfig | None = None,
        *,
        profile_status: dict[str, tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or MonitorConfig()
        self.profiles = profiles
        #: model -> (status, message): ok / missing / corrupt / mismatched
        self.profile_status = dict(profile_status or {})
        for name in profiles:
            self.profile_status.setdefault(name, ("ok", str(profiles[name].path)))
        self.clock = clock
        self._featurizers = {n: featurizer_for(p.extras) for n, p in profiles.items()}
        #: model -> categorical feature -> (category codes, the reference as codes)
        self._cats = {
            n: {f: category_codes(d.values) for f, d in p.features.items() if d.kind == "cat"}
            for n, p in profiles.items()
        }
        self._tracks: dict[tuple[str, str], ModelTrack] = {}
        self._lock = threading.Lock()
        self._thresholds: dict[tuple[str, str, str], float] = {}
        self._states: dict[tuple[str, str, str], FeatureState] = {}
        self._listeners: list[Listener] = []
        self._ticks: list[Callable[[], Any]] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_file: Any = None
        self.checks = 0
        for p in profiles.values():
            for feat in p.features:
                get_stattest(self.config.tests.get(feat, p.features[feat].test))  # fail early

    @property
    def wants_logprobs(self) -> bool:
        """Whether a profile has log-prob features (the server computes them only then)."""
        return any("mean_logprob" in p.features for p in self.profiles.values())

    @property
    def logprob_sample_rate(self) -> float:
        """The share of requests the server scores for :attr:`wants_logprobs` (config)."""
        return self.config.logprob_sample_rate

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(states)`` after every check (on the monitor's thread)."""
        self._listeners.append(fn)

    def add_tick(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` on every wake-up of the background thread (at least once a second)."""
        self._ticks.append(fn)

    # -- the observer side (server's observer thread) ---------------------------------
    def observe(self, record: Any) -> None:
        """Take one finished request (a ``RequestRecord``; read duck-typed)."""
        model = getattr(record, "model", "")
        if not model:
            return
        track = self._track(model, str(getattr(record, "version", "")))
        track.count(record, self.clock())
        if int(getattr(record, "status", 200)) >= 400:
            return
        track.observed += 1
        rows = self._features(model, record)
        for feats in rows:
            track.add(feats)
        if self.config.feature_log is not None and rows:
            self._log_rows(record, rows)
        if track.since_check >= self.config.check_every_requests:
            self._wake.set()

    def _log_rows(self, record: Any, rows: list[dict[str, Any]]) -> None:
        if self._log_file is None:
            assert self.config.feature_log is not None
            self.config.feature_log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.config.feature_log.open("a", buffering=1)
        base = {"time": getattr(record, "time", self.clock()), "model": record.model,
                "version": str(getattr(record, "version", ""))}  # fmt: skip
        prompts = list(getattr(record, "prompt_ids", ()) or ())
        for i, row in enumerate(rows):
            line: dict[str, Any] = {**base, "features": {
                k: v for k, v in row.items() if isinstance(v, float | str)}}  # fmt: skip
            if self.config.log_prompt_ids and i < len(prompts):
                line["prompt_ids"] = [int(t) for t in prompts[i]]
            self._log_file.write(json.dumps(line) + "\n")

    def observe_features(self, model: str, version: str, features: dict[str, Any]) -> None:
        """Add one request's features directly (library use, replays, tests).

        Values are floats, vectors or categories (strings, for ``cat`` profile features:
        the windows hold their codes, categories the reference never had count as one).
        """
        track = self._track(model, version)
        track.requests += 1
        track.observed += 1
        track.since_check += 1
        track.add(features)
        if track.since_check >= self.config.check_every_requests:
            self._wake.set()

    def _track(self, model: str, version: str) -> ModelTrack:
        key = (model, version)
        with self._lock:
            if key not in self._tracks:
                p = self.profiles.get(model)
                kinds: dict[str, str] = {n: f.kind for n, f in p.features.items()} if p else {}
                source = confidence_source(p.features) if p else None
                rolling = None
                if p is not None and source is not None:
                    rolling = RollingConfidence(
                        p.features[source].values, source, self.config.confidence_window,
                        self.config.seed,
                    )  # fmt: skip
                codes = {f: c for f, (c, _) in self._cats.get(model, {}).items()}
                self._tracks[key] = ModelTrack(model, version, kinds, self.config, rolling, codes)
            return self._tracks[key]

    def _features(self, model: str, record: Any) -> list[dict[str, Any]]:
        fz = self._featurizers.get(model)
        return [] if fz is None else record_features(fz, record)

    # -- the checking side (the monitor's own thread) ---------------------------------
    def check(self, *, force: bool = False) -> list[FeatureState]:
        """Test every due window now and return the new states (``force``: all full ones)."""
        now = self.clock()
        with self._lock:
            tracks = list(self._tracks.values())
        new: list[FeatureState] = []
        for track in tracks:
            if track.model not in self.profiles or not (force or track.due(now)):
                continue
            new.extend(self._check_track(track, now))
        self.checks += bool(new)
        if new:
            for fn in self._listeners:
                try:
                    fn(new)
                except Exception:  # a listener bug must not stop monitoring
                    log.exception("monitor listener failed")
        return new

    def _check_track(self, track: ModelTrack, now: float) -> list[FeatureState]:
        profile = self.profiles[track.model]
        full = {f: w for f, w in track.windows.items() if len(w) >= w.capacity}
        rolling = track.rolling.current() if track.rolling is not None else None
        if not full and rolling is None:
            return []
        new_requests = track.take_since_check(now)
        every = min(max(new_requests, 1), self.config.check_every_requests)
        n_tests = len(full) + (rolling is not None)
        alpha = per_test_alpha(self.config.false_alarm_rate, every=every, n_tests=n_tests)
        states = [self._judge_rolling(track, *rolling)] if rolling is not None else []
        for feat, window in full.items():
            ref = profile.features[feat]
            test = get_stattest(self.config.tests.get(feat, ref.test))
            values = self._cats[track.model][feat][1] if ref.kind == "cat" else ref.values
            state = self._judge(track, feat, ref.group, ref.kind, test, values, window, alpha)
            states.append(state)
        for state in states:
            self._states[(track.model, track.version, state.feature)] = state
        return states

    def _judge_rolling(self, track: ModelTrack, stat: float, n: int) -> FeatureState:
        """The handbook's last-N vs previous-N confidence drop, at a calibrated threshold."""
        assert track.rolling is not None
        threshold = track.rolling.threshold(self._floor_alpha(track.model))
        score = stat / threshold if np.isfinite(threshold) else 0.0
        return FeatureState(
            track.model, track.version, ROLLING_FEATURE, "output", ROLLING_TEST, stat, None,
            threshold, "distance", float(score), bool(stat > threshold), n, self.clock(),
        )  # fmt: skip

    def _floor_alpha(self, model: str) -> float:
        """The smallest alpha a check can spend (a time-triggered check after few requests):
        distance thresholds are calibrated once, at it."""
        profile = self.profiles[model]
        n_tests = max(len(profile.features) + (confidence_source(profile.features) is not None), 1)
        floor = max(1, self.config.check_every_requests // 10)
        return per_test_alpha(self.config.false_alarm_rate, every=floor, n_tests=n_tests)

    def _judge(
        self, track: ModelTrack, feat: str, group: str, kind: str, test: StatTest,
        ref: np.ndarray, window: Any, alpha: float,
    ) -> FeatureState:  # fmt: skip
        cur = window.values()
        ref_t = ref.astype(str) if kind == "cat" else ref
        cur_t = cur.astype(str) if kind == "cat" else cur
        p_raw: float | None
        if test.threshold_kind == "p_value":
            if test.name == "mmd":
                perms = min(2000, max(200, int(np.ceil(10 / alpha))))
                stat, p_raw = mmd_pvalue(ref_t, cur_t, perms)
            else:
                stat, p_raw = test.func(ref_t, cur_t, kind)
            p_val = float(p_raw if p_raw is not None else 1.0)
            threshold, drifted, p = alpha, p_val < alpha, p_val
            score = float(np.log(max(p_val, 1e-300)) / np.log(alpha))
        else:
            threshold = self._distance_threshold(track.model, feat, test, ref_t, kind, len(cur))
            stat, p = test.func(ref_t, cur_t, kind)[0], None
            drifted = stat > threshold
            score = float(stat / threshold) if threshold > 0 else (10.0 if stat > 0 else 0.0)
        return FeatureState(
            track.model, track.version, feat, group, test.name, float(stat), p, float(threshold),
            test.threshold_kind, score, bool(drifted), len(cur), self.clock(),
        )  # fmt: skip

    def _distance_threshold(
        self, model: str, feat: str, test: StatTest, ref: np.ndarray, kind: str, n: int
    ) -> float:
        key = (model, feat, test.name)
        if key not in self._thresholds:
            alpha = self._floor_alpha(model)
            self._thresholds[key] = max(
                calibrate_distance(test, ref, kind, window=n, alpha=alpha, seed=self.config.seed),
                1e-12,
            )
        return self._thresholds[key]

    # -- background thread --------------------------------------------------------------
    def start(self) -> None:
        """Start the background checker (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kiln-drift-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background checker and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    close = stop

    def warm_up(self) -> None:
        """Pay the one-time costs at start, not in the first check under traffic: the first
        test imports scipy.stats (~1 s, mostly holding the GIL: the engine and the event
        loop stall), and each distance test calibrates its threshold once."""
        if not self.profiles:
            return
        import scipy.stats  # noqa: F401

        n = self.config.window
        for model, profile in self.profiles.items():
            for feat, ref in profile.features.items():
                test = get_stattest(self.config.tests.get(feat, ref.test))
                if test.threshold_kind != "p_value" and ref.kind == "num":  # as _judge calls it
                    self._distance_threshold(model, feat, test, ref.values, "num", n)

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception:  # a failed warm-up only moves the cost to the first check
            log.exception("monitor warm-up failed")
        tick = min(1.0, self.config.check_every_seconds)
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            for fn in [self.check, *self._ticks]:
                try:
                    fn()
                except Exception:  # keep monitoring whatever one check or rule did
                    log.exception("monitor background step failed")

    # -- exported state -----------------------------------------------------------------
    def states(self) -> list[FeatureState]:
        """The last state of every tested feature."""
        return list(self._states.values())

    def snapshot(self) -> dict[str, Any]:
        """Everything ``GET /v1/monitor`` shows, JSON-ready."""
        now = self.clock()
        with self._lock:
            tracks = list(self._tracks.values())
        models = []
        states = list(self._states.items())  # one C-level copy: the checker thread writes it
        for t in tracks:
            feats = [asdict(s) for k, s in states if k[:2] == (t.model, t.version)]
            status, message = self.profile_status.get(t.model, ("missing", "no profile"))
            models.append({
                "model": t.model, "version": t.version, **t.service_stats(now),
                "profile": {"status": status, "message": message},
                "drift_detected": any(f["drifted"] for f in feats), "drift_checked": bool(feats),
                "features": feats, "windows": t.window_sizes(), "window_fill": t.window_fill(),
            })  # fmt: skip
        known = {m["model"] for m in models}
        for name, (status, message) in self.profile_status.items():
            if name not in known:
                models.append({"model": name, "version": "", "profile":
                               {"status": status, "message": message}, "drift_detected": False,
                               "drift_checked": False, "features": []})  # fmt: skip
        return {"time": now, "config": self.config.model_dump(), "checks": self.checks,
                "models": models}  # fmt: skip
