"""Behaviour of single drift tests beyond the matrix: edge cases the handbook got wrong."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.errors import ConfigError
from modelkiln.monitor.stattests import (
    confidence_degradation,
    default_stattest,
    get_stattest,
)


def test_psi_counts_values_outside_the_reference_range() -> None:
    # the handbook's np.histogram on reference edges dropped these: PSI would read ~0
    ref = np.random.default_rng(0).uniform(0, 1, 2000)
    cur = np.concatenate([np.random.default_rng(1).uniform(0, 1, 1000), np.full(1000, 5.0)])
    r = get_stattest("psi").run(ref, cur)
    assert r.drifted and r.statistic > 1.0
    assert r.p_value is None and r.threshold_kind == "distance"


def test_psi_on_discrete_values_bins_by_value_and_sees_new_ones() -> None:
    ref = np.repeat([1, 2, 3], 300)
    assert not get_stattest("psi").run(ref, np.repeat([1, 2, 3], 100)).drifted
    assert get_stattest("psi").run(ref, np.repeat([1, 2, 3, 4], 100)).drifted


def test_categories_unseen_in_the_reference_count_in_chisquare() -> None:
    ref = ["a", "b"] * 200
    cur = ["a", "b", "zzz"] * 100
    assert get_stattest("chisquare").run(ref, cur, "cat").drifted


def test_result_reports_statistic_p_value_threshold_and_verdict() -> None:
    rng = np.random.default_rng(0)
    r = get_stattest("ks").run(rng.normal(size=200), rng.normal(size=200), threshold=0.01)
    d = r.to_dict()
    assert set(d) >= {"statistic", "p_value", "threshold", "drifted"}
    assert d["threshold"] == 0.01 and d["drifted"] is (d["p_value"] < 0.01)
    assert 0 <= r.score <= 1


def test_unknown_test_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown drift test 'kss'") as e:
        get_stattest("kss")
    assert e.value.hint is not None and "ks" in e.value.hint


def test_wrong_feature_type_and_empty_sample_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="does not take feature type 'cat'"):
        get_stattest("ks").run(["a"], ["b"], "cat")
    with pytest.raises(ConfigError, match="empty sample"):
        get_stattest("ks").run([], [1.0])


def test_registry_defaults_by_type_and_size() -> None:
    assert default_stattest("num", 100).name == "ks"
    assert default_stattest("num", 10_000).name == "wasserstein"
    assert default_stattest("cat", 100).name == "chisquare"
    assert default_stattest("cat", 10_000).name == "jensenshannon"
    assert default_stattest("emb", 50).name == "mmd"
    with pytest.raises(ConfigError):
        default_stattest("image", 10)


def test_confidence_degradation_compares_last_window_with_previous() -> None:
    assert confidence_degradation([0.9] * 999) is None
    small = confidence_degradation([0.9] * 500 + [0.88] * 500)  # a 2.2 % drop
    assert small is not None and not small.drifted
    r = confidence_degradation([0.9] * 500 + [0.8] * 500)
    assert r is not None and r.drifted and r.statistic == pytest.approx(0.1 / 0.9)


def test_mmd_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    ref, cur = rng.normal(size=(120, 4)), rng.normal(size=(120, 4))
    a = get_stattest("mmd").run(ref, cur, "emb")
    b = get_stattest("mmd").run(ref, cur, "emb")
    assert a == b
