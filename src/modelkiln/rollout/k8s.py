"""``kiln rollout export --k8s``: the same canary as an Argo Rollouts ``Rollout`` with an
``AnalysisTemplate`` on Prometheus queries of this server's metrics.

Built from typed models (:mod:`.k8s_models`), validated against the published CRD
schemas shipped in ``rollout/schemas`` (:mod:`.crd`; sources in ``schemas/SOURCES.md``).
The queries compare the canary's pods with the stable pods *at the same time*
(Argo's ``podTemplateHashValue`` args and the ``rollouts_pod_template_hash``
label Prometheus keeps from the pod). Argo judges each measurement by threshold;
the in-process sequential tests have no Argo equivalent, so here the window is
the handbook's: the mean over the last 5 checks (the query range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelkiln.errors import ConfigError
from modelkiln.rollout import k8s_models as m
from modelkiln.rollout.crd import validate
from modelkiln.rollout.policy import CanaryConfig

HASH = "rollouts_pod_template_hash"


def _dns(name: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    if not out:
        raise ConfigError(f"cannot make a Kubernetes name from {name!r}", hint="use letters")
    return out[:63]


def _seconds(s: float) -> str:
    return f"{round(s)}s"


def _queries(window: str) -> dict[str, str]:
    def sel(arg: str, extra: str = "") -> str:
        return f'model_name="{{{{args.model}}}}",{HASH}="{{{{args.{arg}}}}}"{extra}'

    def err(arg: str) -> str:
        errors = sel(arg, ',status=~"5.."')
        return (
            f"sum(rate(ml_requests_total{{{errors}}}[{window}]))"
            f" / clamp_min(sum(rate(ml_requests_total{{{sel(arg)}}}[{window}])), 1e-9)"
        )

    def p95(arg: str) -> str:
        return (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(ml_request_duration_seconds_bucket{{{sel(arg)}}}[{window}]))) * 1000"
        )

    return {
        "error-rate": err("canary-hash"),
        "error-rate-vs-stable": f"({err('canary-hash')}) - ({err('stable-hash')})",
        "latency-p95-ms": p95("canary-hash"),
        "latency-p95-vs-stable": f"({p95('canary-hash')}) / clamp_min({p95('stable-hash')}, 1)",
    }


def analysis_template(name: str, cfg: CanaryConfig, prometheus: str) -> m.AnalysisTemplate:
    """The SLO gates as an AnalysisTemplate (absolute and versus the stable pods)."""
    interval = _seconds(cfg.check_interval_s)
    q = _queries(_seconds(cfg.check_interval_s * cfg.window))
    conditions = {
        "error-rate": f"result[0] <= {cfg.max_error_rate}",
        "error-rate-vs-stable": f"result[0] <= {cfg.max_error_rate / 2}",
        "latency-p95-ms": f"result[0] <= {cfg.max_latency_ms}",
        "latency-p95-vs-stable": "result[0] <= 1.5",
    }
    metrics = [
        m.Metric(
            name=k,
            interval=interval,
            success_condition=conditions[k],
            failure_limit=1,
            provider={"prometheus": m.PrometheusProvider(address=prometheus, query=q[k])},
        )
        for k in conditions
    ]
    args = [m.Arg(name="model"), m.Arg(name="canary-hash"), m.Arg(name="stable-hash")]
    return m.AnalysisTemplate(
        metadata=m.ObjectMeta(name=f"{_dns(name)}-slo", labels={"app": _dns(name)}),
        spec=m.AnalysisTemplateSpec(args=args, metrics=metrics),
    )


def rollout(name: str, version: str, cfg: CanaryConfig, image: str) -> m.Rollout:
    """The canary ramp as a Rollout running ``image:version`` (last 3 revisions kept)."""
    app = _dns(name)
    steps: list[m.CanaryStep] = []
    for pct in cfg.steps[:-1]:  # reaching 100 % is Argo's promotion, as in-process
        steps += [
            m.CanaryStep(set_weight=pct),
            m.CanaryStep(pause={"duration": _seconds(cfg.dwell_s)}),
        ]
    container = {
        "name": "model-server", "image": f"{image}:{version}",
        "args": ["serve", "--model", f"registry://{name}@{version}", "--host", "0.0.0.0"],
        "ports": [{"containerPort": 8000, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 10},
    }  # fmt: skip
    hashes = [
        m.Arg(name="model", value=name),
        m.Arg(name="canary-hash", value_from={"podTemplateHashValue": "Latest"}),
        m.Arg(name="stable-hash", value_from={"podTemplateHashValue": "Stable"}),
    ]
    canary = m.CanaryStrategy(
        steps=steps,
        analysis=m.RolloutAnalysis(templates=[{"templateName": f"{app}-slo"}], args=hashes),
    )
    return m.Rollout(
        metadata=m.ObjectMeta(name=app, labels={"app": app}),
        spec=m.RolloutSpec(
            replicas=4, revision_history_limit=3, selector={"matchLabels": {"app": app}},
            template={"metadata": {"labels": {"app": app}}, "spec": {"containers": [container]}},
            strategy={"canary": canary},
        ),
    )  # fmt: skip


def write_manifests(
    out: Path, name: str, version: str, cfg: CanaryConfig, *, image: str, prometheus: str,
    flagger: bool = False,
) -> list[Path]:  # fmt: skip
    """Write ``rollout.yaml`` and ``analysis-template.yaml`` (validated first) into ``out``;
    with ``flagger``, ``canary.yaml`` and ``metric-templates.yaml`` instead (Flagger)."""
    docs: dict[str, list[dict[str, Any]]]
    if flagger:
        from modelkiln.rollout import flagger as fl

        docs = {
            "canary.yaml": [fl.canary(_dns(name), cfg)],
            "metric-templates.yaml": fl.metric_templates(_dns(name), name, prometheus),
        }
    else:
        docs = {
            "rollout.yaml": [_dump(rollout(name, version, cfg, image))],
            "analysis-template.yaml": [_dump(analysis_template(name, cfg, prometheus))],
        }
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for fname, objs in docs.items():
        for doc in objs:
            validate(doc)
        path = out / fname
        path.write_text(yaml.safe_dump_all(objs, sort_keys=False), encoding="utf-8")
        files.append(path)
    return files


def _dump(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    return out
