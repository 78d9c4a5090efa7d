"""The ``monitor`` pipeline stage's run, and the optimize stage's reference profile (wiring).

It composes three packages — the server (:mod:`modelkiln.serve`, and its
:func:`~modelkiln.serve.stage.choose_model`: the same model the serve stage
serves), the load generator (:mod:`modelkiln.bench`) and the monitor
(:mod:`modelkiln.monitor`) — so it lives here, in the wiring layer. It profiles
the served model on the data stage's held-out ``test`` split (cut into chunks,
half for the profile), serves it with the online monitor and a drift alert rule
whose webhook is a receiver this stage starts on 127.0.0.1, replays the other
half of the held-out chunks (no drift expected), then seeded English prose
(drift expected), and records each phase's verdict, per-feature figures, plots
and the alerts the receiver got (stage layout: :mod:`modelkiln.monitor.stage`).

The pipeline runs the optimize stage through :func:`run_optimize_stage` here: the
optimize package's stage, then a reference profile of the promoted model on the
data stage's held-out split, written next to it (``model/monitor_profile``), so
the profile is versioned with the artifact (the stage manifest hashes it) and
``kiln serve`` monitors the promoted model out of the box. The optimize package
never imports the monitor.

Example:
    >>> ctx = StageContext(pipeline=cfg, config=MonitorStageConfig(), out=out,
    ...                    inputs={"data": data, "train": train}, metrics={})
    >>> run_monitor_stage(ctx); ctx.metrics["prose"]["drift_detected"]
    True
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.contract import MODEL_DIR, REPORT_MD, VARIANT_JSON
from modelkiln.contract import MONITOR_PROFILE_DIR as PROFILE_DIR
from modelkiln.errors import DataError, KilnError, ServingError, StageError
from modelkiln.monitor.stage import (
    MonitorStageConfig,
    prose_texts,
    stage_report,
    text_chunks,
    webhook_sink,
)
from modelkiln.serve.stage import ServeTarget, choose_model

if TYPE_CHECKING:
    from modelkiln.monitor.online import DriftMonitor
    from modelkiln.monitor.profile import Profile
    from modelkiln.stages import StageContext

log = logging.getLogger(__name__)
NAME = "model"
#: Fewer held-out rows than this make no usable reference (calibration draws from it).
MIN_PROFILE_ROWS = 20
PHASES = ("held_out", "prose")


def run_monitor_stage(ctx: StageContext) -> None:
    """Pipeline entry point: profile, serve with the monitor, replay both phases, report.

    Raises:
        StageError: no data or model artifact, too little held-out data, or no server.
    """
    from modelkiln.contract.hfmodel import load_tokenizer
    from modelkiln.monitor.profile import load_profile

    cfg = ctx.config
    assert isinstance(cfg, MonitorStageConfig)
    if "data" not in ctx.inputs:
        raise StageError("the monitor stage needs the 'data' artifact (its test split)",
                         hint="add 'data' before 'monitor' in stages")  # fmt: skip
    choice = choose_model(ctx.inputs)
    seed = ctx.pipeline.seed
    ref_texts, replay = _split_heldout(ctx.inputs["data"].path, cfg, seed)
    ctx.progress.message(
        f"monitor: profiling {choice.path.name} on {len(ref_texts)} held-out chunks"
    )
    folder, note = _profile(choice, ref_texts, cfg, ctx.out / "profile", seed)
    profile = load_profile(folder)
    tok = load_tokenizer(choice.path)
    traffic = {  # both phases cut as the profile was: the drift is in the content, not the cut
        name: [_cut(tok, t, cfg.max_prompt_tokens) for t in texts]
        for name, texts in (("held_out", replay), ("prose", prose_texts(cfg.requests, seed)))
    }
    summary = _serve_and_replay(ctx, choice, profile, traffic)
    summary.update(served_path=str(choice.path), profile_rows=len(ref_texts),
                   window=cfg.window, check_every_requests=cfg.check_every_requests,
                   false_alarm_rate=cfg.false_alarm_rate)  # fmt: skip
    _phase_reports(profile, ctx.out, {k: p["requests"] for k, p in summary["phases"].items()})
    phases = summary["phases"]
    ok = (not phases["held_out"]["drift_detected"] and phases["prose"]["drift_detected"]
          and bool(summary["alerts_received"]))  # fmt: skip
    if not ok:
        log.warning("monitor stage: the expected outcome (no drift, then drift and an alert) "
                    "was not seen; see %s", ctx.out / REPORT_MD)  # fmt: skip
    ctx.metrics.update({
        "served_path": str(choice.path), "served_source": choice.source, "profile": note,
        "profile_rows": len(ref_texts), "alerts_received": len(summary["alerts_received"]),
        "expected_outcome": ok,
        **{k: {kk: p[kk] for kk in ("requests", "errors", "drift_detected", "drifted_features")}
           for k, p in summary["phases"].items()},
    })  # fmt: skip
    (ctx.out / "monitor.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (ctx.out / REPORT_MD).write_text(stage_report(summary, note), encoding="utf-8")


def run_optimize_stage(ctx: StageContext) -> None:
    """The optimize stage, then a reference profile next to the model it promoted.

    A profile that cannot be computed (too little held-out data, a variant the
    profiler cannot load) is logged and recorded in the metrics; the promoted model
    stands (``kiln serve`` then runs it unmonitored and says so).
    """
    from modelkiln.optimize.stage import run_optimize_stage as optimize

    optimize(ctx)
    cfg = getattr(ctx.pipeline, "monitor", None)
    promoted = ctx.out / MODEL_DIR
    if not isinstance(cfg, MonitorStageConfig) or not cfg.profile_promoted:
        return
    if not promoted.is_dir() or "data" not in ctx.inputs:
        return
    ctx.progress.message("optimize: reference profile of the promoted model (held-out split)")
    try:
        ctx.metrics["monitor_profile"] = profile_promoted(
            promoted, ctx.inputs["data"].path, cfg, ctx.pipeline.seed
        )
    except (KilnError, OSError, ValueError) as exc:
        log.warning("no reference profile for the promoted model: %s", exc)
        ctx.metrics["monitor_profile"] = {"error": str(exc)}


def profile_promoted(
    model_dir: Path, data: Path, cfg: MonitorStageConfig, seed: int
) -> dict[str, Any]:
    """Profile ``model_dir`` (a promoted variant) on ``data``'s held-out split, next to it.

    Torch variants get request and output features; other formats (ONNX) get the
    request features, which need only the tokenizer (the torch profiler would read
    another model's logits: a false drift by construction).
    """
    from modelkiln.contract import read_variant_json
    from modelkiln.monitor.profile import load_profile
    from modelkiln.monitor.profiling import compute_profile, load_heldout_texts
    from modelkiln.monitor.stage import request_profile

    chunks = text_chunks(load_heldout_texts(data), cfg.chunk_lines)
    if len(chunks) < MIN_PROFILE_ROWS:
        raise DataError(
            f"the data stage's test split gives only {len(chunks)} chunks of {cfg.chunk_lines} "
            f"lines; a reference profile needs at least {MIN_PROFILE_ROWS}",
            hint="raise data.test_fraction or data.max_files, or lower monitor.chunk_lines",
        )
    random.Random(seed).shuffle(chunks)
    texts = chunks[: cfg.profile_samples]
    info = read_variant_json(model_dir) if (model_dir / VARIANT_JSON).is_file() else {}
    torch_weights = info.get("backend", "torch") == "torch" and any(model_dir.glob("*.safetensors"))
    source = "data stage test split"
    if torch_weights:
        folder = compute_profile(model_dir, texts, max_samples=len(texts), seed=seed,
                                 max_prompt_tokens=cfg.max_prompt_tokens,
                                 gen_tokens=cfg.max_tokens, source=source)  # fmt: skip
    else:
        folder = request_profile(model_dir, texts, model_dir / PROFILE_DIR, model_name=NAME,
                                 max_prompt_tokens=cfg.max_prompt_tokens,
                                 source=source)  # fmt: skip
    profile = load_profile(folder)
    return {"path": f"{MODEL_DIR}/{folder.name}", "rows": len(texts),
            "features": sorted(profile.features), "variant": info.get("variant")}  # fmt: skip


def _split_heldout(data: Path, cfg: MonitorStageConfig, seed: int) -> tuple[list[str], list[str]]:
    """Held-out chunks, shuffled: the profile's, and the replay's from the other chunks."""
    from modelkiln.monitor.profiling import load_heldout_texts

    chunks = text_chunks(load_heldout_texts(data), cfg.chunk_lines)
    if len(chunks) < 40:
        raise StageError(
            f"the data stage's test split gives only {len(chunks)} chunks of "
            f"{cfg.chunk_lines} lines (at least 40 are needed)",
            hint="raise data.test_fraction or data.max_files, or lower monitor.chunk_lines",
        )
    random.Random(seed).shuffle(chunks)
    n_ref = min(cfg.profile_samples, len(chunks) // 2)
    ref, rest = chunks[:n_ref], chunks[n_ref:]
    replay = [rest[i % len(rest)] for i in range(cfg.requests)]
    return ref, replay


def _cut(tok: Any, text: str, max_tokens: int) -> str:
    """The prompt the profile saw for ``text``: its first ``max_tokens`` tokens, decoded."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return str(tok.decode(ids))


def _profile(
    choice: ServeTarget, texts: list[str], cfg: MonitorStageConfig, out: Path, seed: int
) -> tuple[Path, str]:
    """Profile the served model: every feature for a torch model, request features otherwise.

    Output features (log-prob, entropy) of an ONNX or adapter-merged model would
    come from another model's logits in the torch profiler, a false drift by
    construction; request features depend on the tokenizer only.
    """
    from modelkiln.monitor.profiling import compute_profile
    from modelkiln.monitor.stage import request_profile

    source = "data stage test split"
    if choice.backend == "torch" and choice.adapter is None:
        folder = compute_profile(choice.path, texts, out=out, model_name=NAME,
                                 max_samples=len(texts), max_prompt_tokens=cfg.max_prompt_tokens,
                                 gen_tokens=cfg.max_tokens, source=source, seed=seed)  # fmt: skip
        return folder, f"{choice.note}; request and output features profiled"
    folder = request_profile(choice.path, texts, out, model_name=NAME,
                             max_prompt_tokens=cfg.max_prompt_tokens, source=source)  # fmt: skip
    return (
        folder,
        f"{choice.note}; request features profiled (output features need its torch model)",
    )


def _server(choice: ServeTarget, cfg: MonitorStageConfig, hooks: Any) -> Any:
    from modelkiln.serve import ModelServer, ModelSpec, ServeConfig
    from modelkiln.serve.config import CacheConfig, GenerationConfig

    # fp32 as in the profile: a bf16 server would shift log-probs, a drift by construction
    precision: dict[str, Any] = {"precision": "fp32"} if choice.backend == "torch" else {}
    spec = ModelSpec(path=choice.path, name=NAME, adapter=choice.adapter, kind="causal_lm",
                     backend=choice.backend, **precision)  # fmt: skip
    serve_cfg = ServeConfig(models=[spec], port=0, threads=cfg.threads,
                            generation=GenerationConfig(max_num_seqs=16),
                            cache=CacheConfig(enabled=False), drain_timeout_s=10.0)  # fmt: skip
    return ModelServer(config=serve_cfg, hooks=hooks)


def _serve_and_replay(
    ctx: StageContext, choice: ServeTarget, profile: Profile, traffic: dict[str, list[str]]
) -> dict[str, Any]:
    """Serve with monitor + alerts, replay each phase, return verdicts and received alerts."""
    from modelkiln.contract.serving import ServeHooks
    from modelkiln.monitor.alerts import AlertManager, AlertsConfig
    from modelkiln.monitor.online import DriftMonitor, MonitorConfig
    from modelkiln.monitor.serving import monitor_router

    cfg = ctx.config
    assert isinstance(cfg, MonitorStageConfig)
    # a short replay: score every request (the server samples 10 % by default)
    mcfg = MonitorConfig(window=cfg.window, check_every_requests=cfg.check_every_requests,
                         false_alarm_rate=cfg.false_alarm_rate, seed=ctx.pipeline.seed,
                         feature_log=ctx.out / "features.jsonl",
                         logprob_sample_rate=1.0)  # fmt: skip
    monitor = DriftMonitor({NAME: profile}, mcfg)
    phase = {"name": PHASES[0]}
    drifted: dict[str, set[str]] = {p: set() for p in PHASES}
    monitor.add_listener(
        lambda states: drifted[phase["name"]].update(s.feature for s in states if s.drifted)
    )
    with webhook_sink() as sink:
        alerts = AlertManager(AlertsConfig.model_validate({
            "channels": [{"name": "hook", "type": "webhook", "url": sink.url}],
            "rules": [{"name": "drift", "kind": "drift", "feature": "*"}],
            "log": str(ctx.out / "alerts.jsonl"), "retry_attempts": 3, "retry_backoff_s": 0.2,
        }))  # fmt: skip
        alerts.attach(monitor)
        monitor.start()
        hooks = ServeHooks(observers=[monitor], routers=[monitor_router(monitor)])
        server = _server(choice, cfg, hooks)
        try:
            try:
                url = server.start(timeout=cfg.startup_timeout_s)
            except ServingError as exc:
                raise StageError(f"the server did not start: {exc}", hint=exc.hint) from exc
            phases = {}
            for name in PHASES:
                phase["name"] = name
                phases[name] = _replay(ctx, url, monitor, traffic[name], drifted[name])
            deadline = time.monotonic() + cfg.alert_timeout_s
            while not sink.firing() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            server.stop()
            monitor.stop()
            alerts.close()
        received = sink.firing()
    return {"phases": phases, "alerts_received": received}


def _replay(
    ctx: StageContext, url: str, monitor: DriftMonitor, prompts: list[str], drifted: set[str]
) -> dict[str, Any]:
    """Send ``prompts`` once each, wait until the monitor saw them, test, return the verdict."""
    from modelkiln.bench import run_load

    cfg = ctx.config
    assert isinstance(cfg, MonitorStageConfig)
    before = _observed(monitor)
    report = run_load(url, prompts, model=NAME, concurrency=cfg.concurrency,
                      num_requests=len(prompts), max_tokens=cfg.max_tokens,
                      seed=ctx.pipeline.seed)  # fmt: skip
    summary = report.summary()
    deadline = time.monotonic() + 30
    while _observed(monitor) < before + summary["requests"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's observer thread hands records over asynchronously
    states = monitor.check(force=True)
    drifted.update(s.feature for s in states if s.drifted)
    feats = [
        {k: getattr(s, k) for k in ("feature", "test", "statistic", "p_value", "threshold",
                                    "score", "drifted", "n_current")}
        for s in sorted(states, key=lambda s: s.feature)
    ]  # fmt: skip
    return {"requests": summary["requests"], "errors": summary["errors"],
            "drift_detected": bool(drifted), "drifted_features": sorted(drifted),
            "features": feats}  # fmt: skip


def _observed(monitor: DriftMonitor) -> int:
    return sum(int(m.get("requests", 0)) for m in monitor.snapshot()["models"])


def _phase_reports(profile: Profile, out: Path, counts: dict[str, int]) -> None:
    """Split the feature log by phase and write each phase's drift report (JSON, HTML, PNG)."""
    from modelkiln.monitor.report import read_feature_log, write_report

    log_path = out / "features.jsonl"
    lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else []
    start = 0
    for name, n in counts.items():
        part = out / name / "features.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("".join(f"{line}\n" for line in lines[start : start + n]), "utf-8")
        start += n
        if n:
            write_report(profile, read_feature_log(part), out / name)
