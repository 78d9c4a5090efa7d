"""The one exception tree of modelkiln.

Every error a user can cause is a :class:`KilnError`; the CLI prints it as one
line (``error: <message> — fix: <hint>``) and shows the traceback only with
``--debug``::

    KilnError
    ├── ConfigError             bad YAML, unknown field, bad value, bad --set
    ├── ArtifactError           missing/corrupt run directory or manifest
    ├── DataError               corpus/dataset cannot be built or read
    ├── DependencyMissingError  an optional extra is not installed
    ├── EnvironmentCheckError   the machine cannot run the pipeline
    ├── StageError              a pipeline stage failed or is unavailable
    ├── QualityGateError        an optimized model fails its quality gate
    └── ServingError            the server cannot start or serve
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error a user can cause.

    Args:
        message: what is wrong, naming the bad value.
        hint: how to fix it (one short sentence), shown after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — fix: {self.hint}" if self.hint else self.message


class ConfigError(KilnError):
    """A config file, field or override is invalid."""


class ArtifactError(KilnError):
    """A run directory, artifact or manifest is missing, incomplete or corrupt."""


class DataError(KilnError):
    """A corpus or dataset cannot be built or read."""


class DependencyMissingError(KilnError):
    """An optional dependency is not installed."""

    def __init__(
        self, package: str, extra: str, *, purpose: str = "", hint: str | None = None
    ) -> None:
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"the Python package '{package}' is not installed{what}",
            hint=hint or f"pip install 'modelkiln[{extra}]'",
        )
        self.package = package
        self.extra = extra


class EnvironmentCheckError(KilnError):
    """The machine cannot run the pipeline (found by ``kiln doctor``)."""


class StageError(KilnError):
    """A pipeline stage failed, is unknown, or is not available yet."""


class QualityGateError(KilnError):
    """An optimized artifact failed its quality gate and was not promoted."""


class ServingError(KilnError):
    """The model server cannot start or cannot serve a request."""


class SecurityError(KilnError):
    """A key, token, signature, ciphertext or audit log failed a security check."""


def require(module: str, extra: str, *, purpose: str = "") -> None:
    """Raise :class:`DependencyMissingError` unless ``module`` can be imported.

    Example:
        >>> require("json", "dev")  # stdlib: always present
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DependencyMissingError(module, extra, purpose=purpose)
