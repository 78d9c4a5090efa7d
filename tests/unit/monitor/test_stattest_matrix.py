"""The shared matrix: every registered drift test, seeded shifts, power and false positives."""

from __future__ import annotations

import pytest

from modelkiln.monitor.power import NULL_SCENARIOS, SCENARIOS, applicable, rate
from modelkiln.monitor.stattests import registered

TRIALS = 20
N = 1500  # above the registry's LARGE_SAMPLE, where the distance tests are its defaults

#: Shifts every applicable test must catch (power >= 0.9), except the listed blind spots.
MUST_DETECT = ("mean_0.5", "variance_x2", "cat_shift", "emb_0.25", "conf_drop_10pct")
BLIND = {("t_test", "variance_x2")}  # Welch's t compares means only

CASES = [(t, s) for t in sorted(registered()) for s in SCENARIOS if applicable(t, s)]


@pytest.mark.parametrize(("test", "scenario"), [c for c in CASES if c[1] in NULL_SCENARIOS])
def test_false_positive_rate_without_shift(test: str, scenario: str) -> None:
    assert rate(test, scenario, n=N, trials=TRIALS) <= 0.15


@pytest.mark.parametrize(
    ("test", "scenario"), [c for c in CASES if c[1] in MUST_DETECT and c not in BLIND]
)
def test_power_on_shift(test: str, scenario: str) -> None:
    assert rate(test, scenario, n=N, trials=TRIALS) >= 0.9


@pytest.mark.parametrize(("test", "scenario"), sorted(BLIND))
def test_documented_blind_spots_stay_blind(test: str, scenario: str) -> None:
    assert rate(test, scenario, n=N, trials=TRIALS) <= 0.15


def test_every_registered_test_is_in_the_matrix() -> None:
    covered = {t for t, s in CASES if s in NULL_SCENARIOS} & {
        t for t, s in CASES if s in MUST_DETECT
    }
    assert covered == set(registered())
