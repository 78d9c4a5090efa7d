"""Which models the server behind the gateway loads for a set of versions (pure).

A full model version is served on its own (``<model>.v<N>``). A PEFT adapter version is,
by default, a *runtime* adapter on one shared base model (``<model>.base:v<N>``, loaded
by the gateway through the server's ``/admin/adapters`` once it is ready), so a LoRA
canary costs one base model in memory, not one merged copy per version; ``"merged"``
keeps the older behaviour (each adapter merged into its own copy of the base at load).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelkiln.errors import ConfigError
from modelkiln.rollout.names import served_name

AdapterMode = Literal["runtime", "merged"]


@dataclass
class RuntimeAdapters:
    """What to load: ``(model, version) -> (base served name, adapter folder)``."""

    adapters: dict[tuple[str, str], tuple[str, str]]
    admin_key: str
    """An admin key of the inner server (internal: generated per gateway)."""
    bases: dict[str, str] = field(default_factory=dict)
    """Base model folder (resolved) -> its served name."""
    timeout_s: float = 600.0
    pending: bool = True
    error: str = ""
    loaded: list[str] = field(default_factory=list)

    def target(self, model: str, version: str) -> str | None:
        """``<base>:v<version>`` for an adapter version, else None."""
        found = self.adapters.get((model, version))
        return f"{found[0]}:v{version}" if found else None


def version_fields(folder: Path) -> dict[str, Any]:
    """``ModelSpec`` path fields of one version: a PEFT adapter version is served as its base
    model with the adapter merged at load (its own served model, so it can be a canary unit).

    Raises:
        ConfigError: an adapter whose base model is not a local folder.
    """
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        return {"path": folder}
    base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(
            f"{folder}: adapter base model {base!r} is not a local folder",
            hint="register adapters trained on a local base model (nothing is downloaded)",
        )
    return {"path": Path(base), "adapter": folder}


def plan_models(
    model: str, folders: dict[str, Path], options: dict[str, Any], adapters: AdapterMode
) -> tuple[list[dict[str, Any]], RuntimeAdapters | None]:
    """``ModelSpec`` fields of every model to load, and the runtime adapters to add.

    Raises:
        ConfigError: an adapter whose base model is not a local folder.
    """
    specs: list[dict[str, Any]] = []
    bases: dict[Path, str] = {}
    runtime: dict[tuple[str, str], tuple[str, str]] = {}
    for v, folder in folders.items():
        fields = version_fields(folder)
        if "adapter" not in fields or adapters == "merged":
            specs.append({**fields, "name": served_name(model, v), "version": v, **options})
            continue
        base = Path(fields["path"]).resolve()
        if base not in bases:
            bases[base] = f"{model}.base" + (str(len(bases) + 1) if bases else "")
            specs.append({"path": base, "name": bases[base], "version": "base", **options})
        runtime[(model, v)] = (bases[base], str(fields["adapter"]))
    if not runtime:
        return specs, None
    named = {str(path): name for path, name in bases.items()}
    return specs, RuntimeAdapters(runtime, admin_key=secrets.token_urlsafe(24), bases=named)
