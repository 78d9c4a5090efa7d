"""``kiln deploy k8s``: plain manifests (one file per object + all.yaml) and a Helm chart.

Both come from the same builders in :mod:`.k8s`; the chart's templates are those
builders run over :class:`~modelkiln.deploy.values.HelmRefs`, so values.yaml is the
only thing a user edits and the rendered chart equals the plain manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelkiln import __version__
from modelkiln.deploy._yaml import dump, dump_all, write
from modelkiln.deploy.config import DeployConfig
from modelkiln.deploy.k8s import OBJECTS
from modelkiln.deploy.validate import validate_k8s, validators_installed
from modelkiln.deploy.values import HelmRefs, Plain, to_template, values

#: Objects whose CRDs must be installed first; kept out of all.yaml.
CRD_OBJECTS = ("servicemonitor", "scaledobject")


def manifests(cfg: DeployConfig, vals: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every object by file stem, built from ``vals`` (default: the config's values)."""
    source = Plain(vals if vals is not None else values(cfg), cfg.namespace)
    return {stem: build(cfg, source) for stem, (build, _flag) in OBJECTS.items()}


def write_k8s(cfg: DeployConfig, out: str | Path) -> list[Path]:
    """Write ``out/k8s/<object>.yaml`` for each object, ``all.yaml`` and the Helm chart.

    ``all.yaml`` holds the core objects with the HPA; the ServiceMonitor and the KEDA
    ScaledObject need their operators' CRDs and are applied separately (use the
    ScaledObject *instead of* the HPA, never both). Every object is validated first
    (Kubernetes schemas + vendored CRD schemas) when the deploy extra is installed.
    """
    out = Path(out)
    objs = manifests(cfg)
    if validators_installed():
        for obj in objs.values():
            validate_k8s(obj)
    written = [write(out / "k8s" / f"{stem}.yaml", dump(obj)) for stem, obj in objs.items()]
    core = [obj for stem, obj in objs.items() if stem not in (*CRD_OBJECTS,)]
    written.append(write(out / "k8s" / "all.yaml", dump_all(core)))
    written += write_helm(cfg, out / "helm" / cfg.name)
    return written


def chart_templates(cfg: DeployConfig) -> dict[str, str]:
    """Template file name -> Go template text."""
    refs = HelmRefs(values(cfg), cfg.namespace)
    templates = {}
    for stem, (build, flag) in OBJECTS.items():
        body = to_template(dump(build(cfg, refs), width=100_000))
        if flag:
            body = f"{{{{- if .Values.{flag} }}}}\n{body}{{{{- end }}}}\n"
        templates[f"{stem}.yaml"] = body
    return templates


def write_helm(cfg: DeployConfig, chart_dir: str | Path) -> list[Path]:
    """Write Chart.yaml, values.yaml and templates/ of the chart."""
    chart_dir = Path(chart_dir)
    chart = {
        "apiVersion": "v2",
        "name": cfg.name,
        "description": "modelkiln OpenAI-compatible model server",
        "type": "application",
        "version": "0.1.0",
        "appVersion": __version__,
    }
    written = [
        write(chart_dir / "Chart.yaml", dump(chart)),
        write(chart_dir / "values.yaml", dump(values(cfg))),
    ]
    for name, text in chart_templates(cfg).items():
        written.append(write(chart_dir / "templates" / name, text))
    notes = (
        "API keys: kubectl create secret generic "
        f"{cfg.name}-keys --from-literal=api-keys=KEY1,KEY2 --from-literal=admin-keys=KEY\n"
    )
    written.append(write(chart_dir / "templates" / "NOTES.txt", notes))
    return written
