"""Names the server behind the gateway serves versions under (a leaf module)."""

from __future__ import annotations


def served_name(model: str, version: str) -> str:
    """The name the inner server serves one version under."""
    return f"{model}.v{version}"
