"""``kiln monitor``: reference profiles, drift reports, alert rules, Prometheus/Grafana files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelkiln.cli._common import console, guard

monitor_app = typer.Typer(
    help="Watch served models for drift: reference profiles, reports, alerts, dashboards.\n\n"
    "kiln serve monitors every model that has a profile (MODEL/monitor_profile): "
    "GET /v1/monitor, GET /dashboard, ml_drift_* metrics; --alert-rules YAML sends alerts.",
    no_args_is_help=True,
)


_DATA_HELP = "held-out data: the data stage's folder (test split), a text folder or a .jsonl"
_GEN_HELP = "tokens generated per prompt (causal LMs)"


@monitor_app.command("profile")
def monitor_profile(
    model: Annotated[Path, typer.Argument(help="model folder (config.json + weights)")],
    data: Annotated[Path, typer.Option("--data", help=_DATA_HELP)],
    name: Annotated[str | None, typer.Option("--name", help="model name (default: folder)")] = None,
    max_samples: Annotated[int, typer.Option("--max-samples", min=10)] = 500,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=1, help=_GEN_HELP)] = 16,
) -> None:
    """Compute the reference profile of MODEL on held-out data (MODEL/monitor_profile).

    Example: kiln monitor profile runs/quickstart/optimize/model --data runs/quickstart/data
    """
    from modelkiln.monitor.profile import load_profile
    from modelkiln.monitor.profiling import compute_profile, load_heldout_texts

    with guard():
        texts = load_heldout_texts(data)
        out = compute_profile(model, texts, model_name=name, max_samples=max_samples,
                              gen_tokens=gen_tokens, source=str(data))  # fmt: skip
        prof = load_profile(out)
    console.print(f"profile: {out} ({len(prof.features)} features: "
                  f"{', '.join(prof.features)})")  # fmt: skip


@monitor_app.command("report")
def monitor_report(
    reference: Annotated[Path, typer.Option("--reference", help="profile folder")],
    current: Annotated[Path, typer.Option("--current", help="JSONL feature log or a folder")],
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("drift-report"),
    model: Annotated[str | None, typer.Option("--model", help="only this model's lines")] = None,
) -> None:
    """Compare a feature log with a reference profile: report.html, report.json, report.png.

    Example: kiln monitor report --reference MODEL/monitor_profile --current features.jsonl
    """
    from modelkiln.monitor.profile import load_profile
    from modelkiln.monitor.report import read_feature_log, write_report

    with guard():
        prof = load_profile(reference)
        page = write_report(prof, read_feature_log(current, model), out)
    console.print(f"report: {page}")


@monitor_app.command("check-rules")
def monitor_check_rules(
    rules: Annotated[Path, typer.Argument(help="alert rules YAML")],
) -> None:
    """Validate an alert rules file (unknown tests, channels or fields are errors).

    Example: kiln monitor check-rules alerts.yaml
    """
    from modelkiln.monitor.alerts import check_rules

    with guard():
        cfg = check_rules(rules)
    console.print(f"ok: {len(cfg.rules)} rules, {len(cfg.channels)} channels")


@monitor_app.command("export")
def monitor_export(
    out: Annotated[Path, typer.Argument(help="output folder")],
    target: Annotated[str, typer.Option("--target", help="server host:port")] = "127.0.0.1:8000",
    scrape_interval: Annotated[str, typer.Option("--scrape-interval")] = "15s",
    drift_for: Annotated[str, typer.Option("--drift-for", help="KilnDrift 'for'")] = "5m",
) -> None:
    """Write prometheus.yml, kiln-alerts.yml (promtool-valid) and grafana-dashboard.json.

    Example: kiln monitor export monitoring --target 10.0.0.5:8000
    """
    from modelkiln.monitor.export import export_monitoring

    with guard():
        files = export_monitoring(out, target=target, scrape_interval=scrape_interval,
                                  drift_for=drift_for)  # fmt: skip
    for f in files:
        console.print(f"wrote {f}")


@monitor_app.command("tests")
def monitor_tests() -> None:
    """List the drift tests: name, feature types, default threshold.

    Example: kiln monitor tests
    """
    from modelkiln.monitor.stattests import registered

    for t in sorted(registered().values(), key=lambda t: t.name):
        kind = "p <" if t.threshold_kind == "p_value" else ">="
        console.print(f"{t.name:<16} {','.join(t.feature_types):<9} drift when {kind} "
                      f"{t.default_threshold:<5} {t.display_name}", highlight=False)  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add ``monitor`` to the root app."""
    app.add_typer(monitor_app, name="monitor")
