"""Offline validation of the generated files against published schemas.

Kubernetes built-in kinds: ``kubernetes-validate`` (the upstream OpenAPI schemas, strict,
for :data:`~modelkiln.deploy.k8s.K8S_VERSION`). CRDs and compose.yaml: the JSON schemas
vendored in ``deploy/schemas`` (sources and versions in ``schemas/SOURCES.md``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from modelkiln.deploy.k8s import K8S_VERSION
from modelkiln.errors import DependencyMissingError, KilnError

#: (apiVersion, kind) -> vendored openAPIV3Schema of the CRD.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
}


class ManifestInvalidError(KilnError):
    """A generated file does not validate (a modelkiln bug: please report it)."""


@cache
def _schema(name: str) -> dict[str, Any]:
    text = resources.files("modelkiln.deploy").joinpath("schemas").joinpath(name).read_text("utf-8")
    return dict(json.loads(text))


def _jsonschema(doc: Any, schema: dict[str, Any], what: str) -> None:
    try:
        import jsonschema
    except ImportError as exc:
        raise DependencyMissingError("jsonschema", "deploy", purpose="validating") from exc
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "<root>"
        raise ManifestInvalidError(f"{what}: {where}: {errors[0].message}", hint="report a bug")


def validators_installed() -> bool:
    """Whether the deploy extra's validators (jsonschema, kubernetes-validate) import."""
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in ("jsonschema", "kubernetes_validate"))


def validate_k8s(obj: dict[str, Any], version: str = K8S_VERSION) -> None:
    """Validate one Kubernetes object (built-in kinds or the vendored CRDs).

    Raises:
        ManifestInvalidError: the object does not match its schema.
    """
    key = (obj.get("apiVersion"), obj.get("kind"))
    what = f"{key[1]} {obj.get('metadata', {}).get('name')}"
    if key in CRD_SCHEMAS:
        _jsonschema(obj, _schema(CRD_SCHEMAS[key]), what)
        return
    try:
        import kubernetes_validate
    except ImportError as exc:
        raise DependencyMissingError("kubernetes-validate", "deploy") from exc
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path) or "<root>"
        raise ManifestInvalidError(f"{what}: {path}: {exc.message}", hint="report a bug") from exc


def validate_compose(doc: dict[str, Any]) -> None:
    """Validate a compose document against the Compose specification schema."""
    _jsonschema(doc, _schema("compose-spec.json"), "compose.yaml")
