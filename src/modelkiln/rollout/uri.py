"""``registry://NAME@SELECTOR`` model URIs (for ``kiln serve --model registry://...``)."""

from __future__ import annotations

from pathlib import Path

from modelkiln.errors import ConfigError
from modelkiln.rollout.registry import Registry

SCHEME = "registry://"


def is_registry_uri(value: str) -> bool:
    """Whether ``value`` is a ``registry://`` URI."""
    return value.startswith(SCHEME)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME[@SELECTOR]`` into the name and the selector (None = production)."""
    name, _, sel = ref.partition("@")
    if not name or (ref.count("@") and not sel):
        raise ConfigError(
            f"bad model reference {ref!r}",
            hint="write NAME@VERSION, NAME@production or NAME@staging",
        )
    return name, sel or None


def resolve_model_uri(uri: str, registry: Path | str | None = None) -> Path:
    """Turn ``registry://NAME@production`` / ``@staging`` / ``@3`` into a verified local path.

    Anything that is not a registry URI is returned as a path unchanged.

    Raises:
        ArtifactError: missing / archived version, or files changed since registration.
    """
    if not is_registry_uri(uri):
        return Path(uri)
    name, sel = parse_ref(uri[len(SCHEME) :])
    return Registry(registry).resolve(name, sel)


def registry_model_spec(uri: str, registry: Path | str | None = None) -> dict[str, object]:
    """``ModelSpec`` fields for ``kiln serve --model-path registry://NAME@SEL``: the verified
    folder, served as NAME, with the registry version as its version label."""
    name, sel = parse_ref(uri[len(SCHEME) :])
    reg = Registry(registry)
    mv = reg.show(name, sel)
    return {"path": str(reg.resolve(name, mv.version)), "name": name, "version": str(mv.version)}
