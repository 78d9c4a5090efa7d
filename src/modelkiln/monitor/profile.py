"""Reference profiles: the distributions the online monitor and reports compare against.

A profile is a folder (``monitor_profile/`` next to the model it belongs to)::

    monitor_profile/
      profile.json            # documented below; no pickle anywhere
      arrays/<feature>.npy    # one array per feature (np.save, allow_pickle=False)

``profile.json`` (``format`` = ``modelkiln.monitor.profile``, ``format_version`` 1):

- ``model_name``, ``model_hash``: the sha256 over the model's files (the
  profile folder excluded), so a profile of another model or of an older
  version of this one is refused on load;
- ``created``, ``source``: when and from which held-out data it was computed;
- ``features``: name -> ``{kind, group, file, sha256, count, test, stats}``
  where ``kind`` is ``num`` / ``cat`` / ``emb``, ``group`` is ``request``,
  ``output`` or ``table``, ``test`` the default drift test and ``stats``
  summary statistics for people (mean, std, quantiles or category counts);
- ``extras``: name -> ``{file, sha256}`` for arrays that are not features
  (``common_token_ids``: the token ids the rare-token share is measured against;
  ``tokenizer_info``: ``[vocab size, unknown token id or -1]``).

Example::

    write_profile(model_dir / PROFILE_DIR, {"x": FeatureData("num", "request", xs)},
                  model_name="m", model_hash=model_hash(model_dir))
    load_profile(model_dir / PROFILE_DIR, model_hash=model_hash(model_dir)).features["x"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelkiln.artifacts import now, sha256_file
from modelkiln.contract import MONITOR_PROFILE_DIR, MONITOR_PROFILE_JSON
from modelkiln.errors import ArtifactError
from modelkiln.monitor.stattests import default_stattest, get_stattest

PROFILE_DIR = MONITOR_PROFILE_DIR
PROFILE_JSON = MONITOR_PROFILE_JSON
FORMAT = "modelkiln.monitor.profile"
FORMAT_VERSION = 1
#: Files of a model folder that do not count in its hash (the profile itself, logs).
_UNHASHED = (PROFILE_DIR, "monitor_log")
_FIX = "re-compute it: kiln monitor profile MODEL --data DIR"


@dataclass
class FeatureData:
    """One feature's reference values and what they are."""

    kind: Literal["num", "cat", "emb"]
    group: Literal["request", "output", "table"]
    values: np.ndarray
    test: str = ""  # empty: the registry's default for the kind and size
    stats: dict[str, Any] = field(default_factory=dict)


class FeatureEntry(BaseModel):
    """A feature's entry in ``profile.json``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["num", "cat", "emb"] = Field(description="num, cat or emb")
    group: Literal["request", "output", "table"] = Field(description="where it is measured")
    file: str = Field(description="the .npy file, relative to the profile folder")
    sha256: str = Field(description="sha256 of that file")
    count: int = Field(description="number of reference values (rows for emb)")
    test: str = Field(description="default drift test for this feature")
    stats: dict[str, Any] = Field(default_factory=dict, description="summary for people")


class ExtraEntry(BaseModel):
    """An array that is not a feature (e.g. the common token ids)."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="the .npy file, relative to the profile folder")
    sha256: str = Field(description="sha256 of that file")


class ProfileMeta(BaseModel):
    """The whole ``profile.json``."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["modelkiln.monitor.profile"] = Field(description="always this string")
    format_version: int = Field(description="bumped on incompatible changes")
    model_name: str = Field(description="name of the model the profile belongs to")
    model_hash: str = Field(description="sha256 over the model's files")
    created: str = Field(description="UTC time it was written")
    source: str = Field(default="", description="the held-out data it was computed on")
    features: dict[str, FeatureEntry] = Field(description="feature name -> entry")
    extras: dict[str, ExtraEntry] = Field(default_factory=dict, description="other arrays")


@dataclass
class Profile:
    """A loaded profile: its metadata and every array."""

    path: Path
    meta: ProfileMeta
    features: dict[str, FeatureData]
    extras: dict[str, np.ndarray]


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the relative paths and contents of a model's files (profile excluded)."""
    import hashlib

    root = Path(model_dir)
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.split("/")[0] in _UNHASHED:
            continue
        digest.update(f"{rel}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def summarize(kind: str, values: np.ndarray) -> dict[str, Any]:
    """Summary statistics of one feature for people reading ``profile.json``."""
    if kind == "cat":
        cats, counts = np.unique(values.astype(str), return_counts=True)
        top = np.argsort(-counts)[:20]
        return {"categories": {str(cats[i]): int(counts[i]) for i in top}}
    if kind == "emb":
        return {"dim": int(values.shape[1]) if values.ndim == 2 else 1}
    v = values.astype(np.float64)
    q = np.quantile(v, [0.05, 0.5, 0.95]) if len(v) else [np.nan] * 3
    return {
        "mean": float(np.mean(v)) if len(v) else None,
        "std": float(np.std(v)) if len(v) else None,
        "min": float(np.min(v)) if len(v) else None,
        "max": float(np.max(v)) if len(v) else None,
        "p05": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
    }


def write_profile(
    out: str | Path,
    features: dict[str, FeatureData],
    *,
    model_name: str,
    model_hash: str,
    source: str = "",
    extras: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a profile folder and return its path (arrays first, ``profile.json`` last)."""
    out = Path(out)
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    entries: dict[str, FeatureEntry] = {}
    for name, fd in features.items():
        values = fd.values.astype(str) if fd.kind == "cat" else np.asarray(fd.values)
        rel = _save(out, name, values)
        test = fd.test or default_stattest(fd.kind, len(values)).name
        get_stattest(test)  # fails early on a typo
        entries[name] = FeatureEntry(
            kind=fd.kind, group=fd.group, file=rel, sha256=sha256_file(out / rel),
            count=len(values), test=test, stats=fd.stats or summarize(fd.kind, values),
        )  # fmt: skip
    extra_entries = {}
    for name, arr in (extras or {}).items():
        rel = _save(out, name, np.asarray(arr))
        extra_entries[name] = ExtraEntry(file=rel, sha256=sha256_file(out / rel))
    meta = ProfileMeta(
        format=FORMAT, format_version=FORMAT_VERSION, model_name=model_name,
        model_hash=model_hash, created=now(), source=source, features=entries,
        extras=extra_entries,
    )  # fmt: skip
    tmp = out / (PROFILE_JSON + ".tmp")
    tmp.write_text(meta.model_dump_json(indent=2) + "\n")
    tmp.replace(out / PROFILE_JSON)
    return out


def _save(out: Path, name: str, values: np.ndarray) -> str:
    if values.dtype == object:
        values = values.astype(str)
    rel = f"arrays/{name}.npy"
    np.save(out / rel, values, allow_pickle=False)
    return rel


def load_profile(
    path: str | Path, *, model_hash: str | None = None, model_name: str | None = None
) -> Profile:
    """Read and check a profile folder (or its ``profile.json``).

    Raises:
        ArtifactError: missing, truncated or edited files, an unknown format, or a
            profile of another model (``model_hash`` / ``model_name`` given and different).
    """
    path = Path(path)
    root = path.parent if path.name == PROFILE_JSON else path
    meta = _read_meta(root)
    if model_hash is not None and meta.model_hash != model_hash:
        raise ArtifactError(
            f"the profile {root} belongs to another model or version "
            f"(model hash {meta.model_hash[:12]}, this model {model_hash[:12]})",
            hint=_FIX,
        )
    if model_name is not None and meta.model_name != model_name:
        raise ArtifactError(
            f"the profile {root} is of model '{meta.model_name}', not '{model_name}'", hint=_FIX
        )
    feats = {
        n: FeatureData(e.kind, e.group, _load(root, e.file, e.sha256), e.test, e.stats)
        for n, e in meta.features.items()
    }
    extras = {n: _load(root, e.file, e.sha256) for n, e in meta.extras.items()}
    return Profile(root, meta, feats, extras)


def _read_meta(root: Path) -> ProfileMeta:
    file = root / PROFILE_JSON
    if not file.is_file():
        raise ArtifactError(f"no reference profile at {root} (no {PROFILE_JSON})", hint=_FIX)
    try:
        return ProfileMeta.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as e:
        first = str(e).splitlines()[0]
        msg = f"the profile {file} is corrupt or truncated: {first}"
        raise ArtifactError(msg, hint=_FIX) from e


def _load(root: Path, rel: str, sha256: str) -> np.ndarray:
    file = root / rel
    if not file.is_file():
        raise ArtifactError(f"the profile array {file} is missing", hint=_FIX)
    if sha256_file(file) != sha256:
        raise ArtifactError(
            f"the profile array {file} is truncated or was edited (sha256 differs)", hint=_FIX
        )
    try:
        return np.load(file, allow_pickle=False)
    except ValueError as e:
        raise ArtifactError(f"the profile array {file} cannot be read: {e}", hint=_FIX) from e
