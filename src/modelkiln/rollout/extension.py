"""The registry's ``kiln serve`` extension: ``--model-path registry://NAME@production``
(or ``@staging``, ``@3``) serves a verified registry version, named NAME, with the
registry version as its version label; ``--registry DIR`` picks the registry.

Light to import (``kiln serve --help`` imports it): the registry loads on use.
"""

from __future__ import annotations

import argparse
from typing import Any

from modelkiln.rollout.uri import SCHEME


class RegistryExtension:
    """Resolves ``registry://`` model paths for the server."""

    def __init__(self) -> None:
        self.registry: str | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--registry DIR`` (default: $MODELKILN_REGISTRY or the user data directory)."""
        ext = self

        class _Remember(argparse.Action):
            # model_spec() is asked before hooks(args, ...): keep the value as it is parsed.
            def __call__(self, _p: Any, ns: argparse.Namespace, value: Any, _o: Any = None) -> None:
                setattr(ns, self.dest, value)
                ext.registry = str(value)

        parser.add_argument(
            "--registry", metavar="DIR", default=None, action=_Remember,
            help="model registry for --model-path registry://NAME@production|@staging|@N "
            "(default: $MODELKILN_REGISTRY, else ~/.local/share/modelkiln/registry)",
        )  # fmt: skip

    def model_spec(self, path: str) -> dict[str, object] | None:
        """ModelSpec fields of a ``registry://`` path (its files re-hashed); None otherwise.

        Raises:
            ArtifactError: missing / archived version, or files changed since registration.
        """
        if not path.startswith(SCHEME):
            return None
        from modelkiln.rollout.uri import registry_model_spec

        return registry_model_spec(path, self.registry)

    def hooks(self, args: argparse.Namespace, cfg: Any) -> None:
        """No request hooks: the registry only resolves paths."""
        return None
