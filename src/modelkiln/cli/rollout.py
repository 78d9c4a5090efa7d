"""``kiln rollout``: serve several versions behind the rollout gateway; start, watch, promote,
roll back or abort a canary / blue-green / shadow rollout; export it for Argo Rollouts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelkiln.cli._common import console, guard
from modelkiln.cli.registry import RegistryOpt

group = typer.Typer(
    help="Progressive delivery with SLO-gated automatic rollback: canary, blue-green, shadow. "
    "Start the gateway with kiln rollout serve NAME, then kiln rollout start NAME@VERSION.",
    no_args_is_help=True,
)
UrlOpt = Annotated[str, typer.Option("--url", help="Gateway URL (kiln rollout serve).")]
KeyOpt = Annotated[
    str | None, typer.Option("--admin-key", help="Admin key (default: $MODELKILN_ADMIN_KEY).")
]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (goes to the log).")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(url: str, key: str | None, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; a refusal becomes a KilnError with the server's message."""
    import urllib.error
    import urllib.request

    from modelkiln.errors import KilnError

    token = key or os.environ.get("MODELKILN_ADMIN_KEY", "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        msg = json.loads(exc.read() or b"{}").get("error", {}).get("message", str(exc))
        raise KilnError(f"{method} {path}: HTTP {exc.code}: {msg}", hint=_hint(exc.code)) from None
    except urllib.error.URLError as exc:
        raise KilnError(
            f"cannot reach the gateway at {url} ({exc.reason})",
            hint="start it with kiln rollout serve NAME, or pass --url",
        ) from None


def _hint(code: int) -> str:
    if code in (401, 403):
        return "pass the gateway's admin key with --admin-key or $MODELKILN_ADMIN_KEY"
    return "see kiln rollout status NAME"


def _show(view: dict[str, Any]) -> None:
    r = view.get("rollout") or {}
    p = view["policy"]
    console.print(
        f"{view['model']}: versions {', '.join(view['versions'])}; split {p['weights']}"
        + (f"; shadow {p['shadow']} {p['shadow_percent']:g}%" if p.get("shadow") else ""),
        highlight=False,
    )
    if r:
        s = r["spec"]
        console.print(
            f"rollout {s['baseline']} -> {s['candidate']} ({s['strategy']}): {r['status']}, "
            f"stage {r['stage']}; {r['reason']}",
            highlight=False,
        )
    for d in view.get("decisions", []):
        console.print(f"  t={d['time']:.0f} {d['action']:<8} {d['weight']:>5g}%  {d['reason']}")


@group.command("start")
def start(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION of the candidate.")],
    strategy: Annotated[
        str, typer.Option("--strategy", help="canary, blue-green or shadow.")
    ] = "canary",
    steps: Annotated[str, typer.Option("--steps", help="Canary percents.")] = "5,25,50,100",
    dwell: Annotated[float, typer.Option("--dwell", help="Seconds per stage.")] = 600.0,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between checks.")] = 30.0,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate")] = 0.05,
    max_latency_ms: Annotated[float, typer.Option("--max-latency-ms")] = 2000.0,
    shadow_percent: Annotated[float, typer.Option("--shadow-percent")] = 10.0,
    mirror_percent: Annotated[
        float,
        typer.Option(
            "--mirror-percent",
            help="Canary: share of requests also run on the other version to measure both "
            "on the same traffic (extra compute; 0: off).",
        ),
    ] = 100.0,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
) -> None:
    """Start rolling NAME@VERSION out on a running gateway (one rollout per model).

    Example: kiln rollout start tiny@2 --strategy canary --steps 5,25,50,100 --dwell 600
    """
    with guard():
        name, version = _split_ref(ref)
        canary = {
            "steps": [int(s) for s in steps.split(",")], "dwell_s": dwell,
            "check_interval_s": interval, "max_error_rate": max_error_rate,
            "max_latency_ms": max_latency_ms, "mirror_percent": mirror_percent,
        }  # fmt: skip
        body = {"candidate": version, "strategy": strategy, "canary": canary,
                "shadow_percent": shadow_percent}  # fmt: skip
        _show(_call(url, admin_key, "POST", f"/admin/rollout/{name}/start", body))


@group.command("add-version")
def add_version(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION of a registered adapter version.")],
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
) -> None:
    """Add a registry adapter version to a running gateway (a runtime LoRA adapter on the
    base model it already serves), ready to roll out.

    Example: kiln rollout add-version tiny@4 && kiln rollout start tiny@4
    """
    with guard():
        name, version = _split_ref(ref)
        _show(
            _call(url, admin_key, "POST", f"/admin/rollout/{name}/versions", {"version": version})
        )


def _split_ref(ref: str) -> tuple[str, str]:
    from modelkiln.errors import ConfigError

    name, _, version = ref.partition("@")
    if not name or not version:
        raise ConfigError(f"{ref!r} names no version", hint="write NAME@VERSION, e.g. tiny@2")
    return name, version


@group.command("status")
def status(
    name: Annotated[str, typer.Argument(help="Model name.")],
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the split, the rollout's state and its last decisions.

    Example: kiln rollout status tiny
    """
    with guard():
        view = _call(url, admin_key, "GET", f"/admin/rollout/{name}")
    if as_json:
        sys.stdout.write(json.dumps(view, indent=2) + "\n")
    else:
        _show(view)


def _action(action: str) -> Any:
    def command(
        name: Annotated[str, typer.Argument(help="Model name.")],
        reason: ReasonOpt = None,
        url: UrlOpt = DEFAULT_URL,
        admin_key: KeyOpt = None,
    ) -> None:
        with guard():
            body = {"reason": reason} if reason else {}
            _show(_call(url, admin_key, "POST", f"/admin/rollout/{name}/{action}", body))

    command.__doc__ = {
        "promote": "Finish the rollout now with the candidate at 100 %.",
        "rollback": "Finish the rollout now with the baseline at 100 %.",
        "abort": "Stop the rollout; traffic goes back to the baseline.",
    }[action] + f"\n\n    Example: kiln rollout {action} tiny"
    return command


for _name in ("promote", "rollback", "abort"):
    group.command(_name)(_action(_name))


@group.command("serve")
def serve(
    name: Annotated[str, typer.Argument(help="Model name in the registry.")],
    versions: Annotated[
        str | None, typer.Option("--versions", help="Versions to load (default: prod + staging).")
    ] = None,
    registry: RegistryOpt = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="Rollout state.")] = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    admin_key: Annotated[list[str] | None, typer.Option("--admin-key", help="Admin key.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="torch or onnx.")] = None,
    audit_log: Annotated[
        Path | None,
        typer.Option("--audit-log", help="Hash-chained audit log of every rollout decision."),
    ] = None,
) -> None:
    """Serve several registry versions of NAME side by side behind the rollout gateway.

    Example: kiln rollout serve tiny --versions 1,2 --admin-key $KEY --port 8000
    """
    from modelkiln.rollout.registry import Registry
    from modelkiln.rollout.serving import build_gateway, registry_versions, run_gateway

    with guard():
        reg = Registry(registry)
        wanted = versions.split(",") if versions else None
        folders, serving = registry_versions(reg, name, wanted)
        keys = list(admin_key or []) + [
            k for k in os.environ.get("MODELKILN_ADMIN_KEYS", "").split(",") if k
        ]
        gw = build_gateway(
            name, folders, serving=serving, state_dir=state_dir or reg.root / "rollouts",
            admin_keys=keys, registry=reg, audit_log=audit_log, plugins=True,
            model_options={"backend": backend} if backend else None,
        )  # fmt: skip
        console.print(f"serving {name} versions {list(folders)} (all traffic on {serving})")
        run_gateway(gw, host, port)


@group.command("export")
def export(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION (the image tag of the candidate).")],
    k8s: Annotated[Path, typer.Option("--k8s", help="Folder to write the manifests to.")],
    image: Annotated[str, typer.Option("--image", help="Container image (without tag).")] = (
        "ghcr.io/modelkiln/server"
    ),
    prometheus: Annotated[str, typer.Option("--prometheus", help="Prometheus URL.")] = (
        "http://prometheus.monitoring:9090"
    ),
    steps: Annotated[str, typer.Option("--steps", help="Canary percents.")] = "5,25,50,100",
    dwell: Annotated[float, typer.Option("--dwell", help="Seconds per stage.")] = 600.0,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between checks.")] = 30.0,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate")] = 0.05,
    max_latency_ms: Annotated[float, typer.Option("--max-latency-ms")] = 2000.0,
    flagger: Annotated[
        bool, typer.Option("--flagger", help="Write a Flagger Canary + MetricTemplates instead.")
    ] = False,
) -> None:
    """Write the canary policy as an Argo Rollouts Rollout + AnalysisTemplate, or with
    --flagger a Flagger Canary + MetricTemplates (validated against the published CRDs).

    Example: kiln rollout export tiny@2 --k8s deploy/rollout [--flagger]
    """
    from modelkiln.rollout.k8s import write_manifests
    from modelkiln.rollout.policy import CanaryConfig

    with guard():
        name, version = _split_ref(ref)
        cfg = CanaryConfig(
            steps=[int(s) for s in steps.split(",")], dwell_s=dwell, check_interval_s=interval,
            max_error_rate=max_error_rate, max_latency_ms=max_latency_ms,
        )  # fmt: skip
        files = write_manifests(
            k8s, name, version, cfg, image=image, prometheus=prometheus, flagger=flagger
        )
    project = "Flagger" if flagger else "Argo Rollouts"
    for f in files:
        console.print(f"wrote {f} (validated against the published {project} CRD schema)")


def register(app: typer.Typer) -> None:
    """Add the ``rollout`` group to the root app."""
    app.add_typer(group, name="rollout")
