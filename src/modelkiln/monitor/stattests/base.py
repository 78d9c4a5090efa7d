"""The shape every drift test shares: a pure function, a descriptor and a registry entry.

Copied from Evidently's ``stattests`` (one small file per test, ``StatTest`` +
``register_stattest``); what it adds is an explicit p-value *or* distance
threshold in every result, so an online monitor can calibrate either kind.

Example:
    >>> import numpy as np
    >>> from modelkiln.monitor.stattests import get_stattest
    >>> rng = np.random.default_rng(0)
    >>> r = get_stattest("ks").run(rng.normal(size=500), rng.normal(1, 1, 500))
    >>> r.drifted
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from modelkiln.errors import ConfigError

#: Kinds of feature a test can take: numeric scalars, categories, embedding vectors.
FeatureType = Literal["num", "cat", "emb"]
FEATURE_TYPES: tuple[str, ...] = ("num", "cat", "emb")


@dataclass(frozen=True)
class StatResult:
    """One judgement: ``drifted`` is ``p_value < threshold`` or ``statistic >= threshold``."""

    test: str
    statistic: float
    p_value: float | None
    threshold: float
    threshold_kind: Literal["p_value", "distance"]
    drifted: bool
    n_reference: int
    n_current: int

    @property
    def score(self) -> float:
        """One number where larger means more drift (``1 - p`` or the distance)."""
        return 1.0 - self.p_value if self.p_value is not None else self.statistic

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


#: ``(reference, current, feature_type) -> (statistic, p_value or None)``.
StatFunc = Callable[[np.ndarray, np.ndarray, str], tuple[float, float | None]]


@dataclass(frozen=True)
class StatTest:
    """A registered drift test: its function, the feature types it takes and its default."""

    name: str
    display_name: str
    func: StatFunc
    feature_types: tuple[str, ...]
    default_threshold: float
    threshold_kind: Literal["p_value", "distance"]

    def run(
        self,
        reference: Any,
        current: Any,
        feature_type: str = "num",
        threshold: float | None = None,
    ) -> StatResult:
        """Compare ``current`` with ``reference`` and return a verdict.

        Raises:
            ConfigError: the feature type is not one this test takes, or a sample is empty.
        """
        if feature_type not in self.feature_types:
            raise ConfigError(
                f"drift test '{self.name}' does not take feature type '{feature_type}'",
                hint=f"use it on {', '.join(self.feature_types)} features or pick another test",
            )
        ref, cur = _as_array(reference, feature_type), _as_array(current, feature_type)
        if len(ref) == 0 or len(cur) == 0:
            raise ConfigError(
                f"drift test '{self.name}' got an empty sample "
                f"(reference {len(ref)}, current {len(cur)})",
                hint="collect at least one value on each side before testing",
            )
        t = self.default_threshold if threshold is None else float(threshold)
        stat, p = self.func(ref, cur, feature_type)
        drifted = (p < t) if p is not None else (stat >= t)
        return StatResult(
            test=self.name,
            statistic=float(stat),
            p_value=None if p is None else float(p),
            threshold=t,
            threshold_kind=self.threshold_kind,
            drifted=bool(drifted),
            n_reference=len(ref),
            n_current=len(cur),
        )


def _as_array(x: Any, feature_type: str) -> np.ndarray:
    if feature_type == "cat":
        return np.asarray(x).astype(str).ravel()
    arr = np.asarray(x, dtype=np.float64)
    if feature_type == "emb":
        return arr.reshape(len(arr), -1) if arr.ndim != 2 else arr
    return arr.ravel()[np.isfinite(arr.ravel())]


_REGISTRY: dict[str, StatTest] = {}


def register_stattest(test: StatTest) -> StatTest:
    """Add ``test`` to the registry (its name must be new)."""
    if test.name in _REGISTRY and _REGISTRY[test.name] is not test:
        raise ValueError(f"drift test '{test.name}' is registered twice")
    _REGISTRY[test.name] = test
    return test


def registered() -> dict[str, StatTest]:
    """All registered tests by name."""
    return dict(_REGISTRY)
