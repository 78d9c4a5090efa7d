"""Seeded shift scenarios and the power / false-positive table of every drift test.

One matrix serves the unit tests (small n, few trials) and the benchmark
(n = 100, 1,000, 10,000). Each scenario draws a reference and a current sample
from a seeded generator; a test's rate in a scenario is the share of trials it
flags (power under a shift, false-positive rate under ``none``).

Example:
    >>> rate("ks", "none", n=200, trials=20) <= 0.15
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modelkiln.monitor.stattests import get_stattest, registered

Sampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Scenario:
    """A named way to draw (reference, current) and the feature type it produces."""

    name: str
    feature_type: str
    draw: Sampler
    #: Scenarios of confidences in (0, 1]; the only ones ``confidence_drop`` applies to.
    confidences: bool = False


def _normal(shift: float, scale: float = 1.0) -> Sampler:
    return lambda rng, n: (rng.normal(0, 1, n), rng.normal(shift, scale, n))


def _cats(p_cur: list[float]) -> Sampler:
    cats = np.array(["a", "b", "c", "d"])
    p_ref = [0.4, 0.3, 0.2, 0.1]
    return lambda rng, n: (rng.choice(cats, n, p=p_ref), rng.choice(cats, n, p=p_cur))


def _emb(shift: float, dim: int = 8) -> Sampler:
    return lambda rng, n: (rng.normal(0, 1, (n, dim)), rng.normal(shift, 1, (n, dim)))


def _confidence(drop: float) -> Sampler:
    # confidences around 0.8 (sd 0.05); ``drop`` lowers the current mean by that share
    return lambda rng, n: (
        np.clip(rng.normal(0.8, 0.05, n), 0, 1),
        np.clip(rng.normal(0.8 * (1 - drop), 0.05, n), 0, 1),
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("none", "num", _normal(0.0)),
        Scenario("mean_0.1", "num", _normal(0.1)),
        Scenario("mean_0.25", "num", _normal(0.25)),
        Scenario("mean_0.5", "num", _normal(0.5)),
        Scenario("variance_x2", "num", _normal(0.0, 2.0)),
        Scenario("cat_none", "cat", _cats([0.4, 0.3, 0.2, 0.1])),
        Scenario("cat_shift", "cat", _cats([0.25, 0.25, 0.25, 0.25])),
        Scenario("emb_none", "emb", _emb(0.0)),
        Scenario("emb_0.25", "emb", _emb(0.25)),
        Scenario("conf_none", "num", _confidence(0.0), confidences=True),
        Scenario("conf_drop_10pct", "num", _confidence(0.10), confidences=True),
    )
}


#: Scenarios without a shift: a test flagging them is a false positive.
NULL_SCENARIOS = ("none", "cat_none", "emb_none", "conf_none")


def rate(test: str, scenario: str, *, n: int, trials: int, seed: int = 0) -> float:
    """Share of ``trials`` seeded draws of ``scenario`` (n per side) that ``test`` flags."""
    st, sc = get_stattest(test), SCENARIOS[scenario]
    rng = np.random.default_rng([seed, n])
    hits = 0
    for _ in range(trials):
        ref, cur = sc.draw(rng, n)
        hits += st.run(ref, cur, sc.feature_type).drifted
    return hits / trials


def applicable(test: str, scenario: str) -> bool:
    """Whether ``test`` takes the feature type ``scenario`` produces."""
    sc = SCENARIOS[scenario]
    if test == "confidence_drop" and not sc.confidences:
        return False  # a relative drop of a mean near zero means nothing
    return sc.feature_type in registered()[test].feature_types


def power_table(ns: tuple[int, ...], trials: int, seed: int = 0) -> list[dict[str, object]]:
    """Every (test, scenario, n) that applies, with its detection rate."""
    rows: list[dict[str, object]] = []
    for test in sorted(registered()):
        for scenario in SCENARIOS:
            if not applicable(test, scenario):
                continue
            for n in ns:
                r = rate(test, scenario, n=n, trials=trials, seed=seed)
                rows.append({"test": test, "scenario": scenario, "n": n, "rate": r})
    return rows
