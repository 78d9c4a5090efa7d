"""Offline validation of exported manifests against the published CRD schemas shipped in
``rollout/schemas`` (Argo Rollouts ``Rollout`` / ``AnalysisTemplate``, Flagger ``Canary`` /
``MetricTemplate``; sources, commits and licence in ``schemas/SOURCES.md``)."""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from typing import Any

from modelkiln.errors import ConfigError

FILES = {
    ("argoproj.io/v1alpha1", "Rollout"): "argoproj.io_rollout_v1alpha1.json.gz",
    ("argoproj.io/v1alpha1", "AnalysisTemplate"): "argoproj.io_analysistemplate_v1alpha1.json.gz",
    ("flagger.app/v1beta1", "Canary"): "flagger.app_canary_v1beta1.json",
    ("flagger.app/v1beta1", "MetricTemplate"): "flagger.app_metrictemplate_v1beta1.json",
}
_SUBSCHEMAS = ("items", "additionalProperties", "not")
_LISTS = ("allOf", "anyOf", "oneOf")


@functools.cache
def published_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` as published (descriptions removed).

    Raises:
        ConfigError: no schema is shipped for that apiVersion and kind.
    """
    name = FILES.get((api_version, kind))
    if name is None:
        raise ConfigError(
            f"no CRD schema for {api_version} {kind}",
            hint=f"kinds with a schema: {sorted(k for _, k in FILES)}",
        )
    raw = resources.files("modelkiln.rollout").joinpath("schemas").joinpath(name).read_bytes()
    data: dict[str, Any] = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    return data


def strict(schema: Any) -> Any:
    """A copy where every object schema with ``properties`` rejects unknown fields, unless it
    keeps them (``x-kubernetes-preserve-unknown-fields``): the API server would prune them
    silently, so a misspelt field would vanish instead of failing."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = strict(out[key])
    return out


@functools.cache
def _validator(api_version: str, kind: str) -> Any:
    import jsonschema

    schema = strict(published_schema(api_version, kind))
    return jsonschema.Draft7Validator(schema)  # OpenAPI v3 schemas are a draft-4/7 subset


def validate(doc: dict[str, Any]) -> None:
    """Check one manifest against its published CRD schema (strict).

    Raises:
        ConfigError: the manifest does not match (names the path and the problem).
    """
    api, kind = str(doc.get("apiVersion")), str(doc.get("kind"))
    errors = sorted(_validator(api, kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(map(str, first.absolute_path)) or kind
        raise ConfigError(
            f"{kind} manifest invalid at {where}: {first.message}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            hint="this is a bug in kiln rollout export; report it with the config used",
        )
