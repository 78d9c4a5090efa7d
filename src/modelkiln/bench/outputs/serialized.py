"""JSON results and the JSONL history every run can append to."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from modelkiln.errors import ArtifactError

__all__ = ["append_history", "read_history", "read_json", "write_json"]


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """Read a result written by :func:`write_json`.

    Raises:
        ArtifactError: missing or not a JSON object.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"result file not found: {path}", hint="check the path") from None
    except ValueError as exc:
        raise ArtifactError(
            f"{path} is not JSON: {exc}", hint="pass a kiln bench --json file"
        ) from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object", hint="pass a kiln bench --json file")
    return data


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric headline metrics of a serve or offline result."""
    source = result.get("summary") or result.get("headline") or {}
    return {
        k: v for k, v in source.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def append_history(result: dict[str, Any], path: Path, label: str | None = None) -> dict[str, Any]:
    """Append one line (time, label, kind of run, headline metrics) to a JSONL history."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": label or result.get("model") or result.get("name") or "",
        "bench": "serve" if "url" in result else "offline",
        "metrics": _flat_metrics(result),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every entry of a JSONL history, oldest first.

    Raises:
        ArtifactError: the file is missing or a line is not JSON.
    """
    if not path.is_file():
        raise ArtifactError(
            f"history file not found: {path}", hint="run kiln bench ... --history FILE"
        )
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ArtifactError(
                    f"{path}:{n} is not JSON: {exc}", hint="fix or drop that line"
                ) from exc
    return out
