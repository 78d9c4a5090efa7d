"""Code-search pairs: (docstring, function source without the docstring), found with ``ast``.

Every ``def`` and ``async def`` with a docstring becomes a pair, methods and
nested functions included; ``name`` is the qualified name as Python spells it
(``Class.method``, ``outer.<locals>.inner``). The docstring is cleaned with
:func:`inspect.cleandoc`. The code keeps the decorators, is dedented by the
``def`` line's indentation, and has the docstring statement removed (replaced
by ``pass`` when it was the whole body or shared a line with other code), so
it always parses; a pair whose code would not parse is dropped.

Example:
    >>> pairs, skipped = extract_pairs('def f():\\n    "Add one to x, please."\\n    return 1\\n')
    >>> pairs[0].code
    'def f():\\n    return 1\\n'
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    pass

_LINE_END = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCK_FIELDS = ("body", "handlers", "orelse", "finalbody", "cases")
Func: TypeAlias = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True)
class CodePair:
    """One code-search pair."""

    docstring: str
    code: str
    name: str
    path: str = ""
    module: str = ""


def split_lines(text: str) -> list[str]:
    """Split on the line ends ``ast`` counts (``\\n``, ``\\r\\n``, ``\\r``), keeping them.

    ``str.splitlines`` also splits on form feeds and other separators, which
    would shift ``ast`` line numbers.
    """
    return [line for line in _LINE_END.split(text) if line]


def _functions(tree: ast.AST) -> Iterator[tuple[str, Func]]:
    """Yield ``(qualified name, node)`` for every function, in source order.

    Only statement lists are walked (functions are statements), which skips
    the expression trees that make up most of a module.
    """

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Func]]:
        for child in _statement_children(node):
            if isinstance(child, _FUNCTIONS):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _statement_children(node: ast.AST) -> Iterator[ast.AST]:
    """Statements directly inside ``node``, plus ``except`` handlers and ``match`` cases."""
    for name in _BLOCK_FIELDS:
        yield from getattr(node, name, ())


def _span(line: str, start: int | None = None, end: int | None = None) -> str:
    """Slice ``line`` by ``ast`` column offsets, which count UTF-8 bytes."""
    return line.encode("utf-8")[start:end].decode("utf-8")


def _strip_docstring(lines: list[str], node: Func) -> list[str]:
    """Return the source lines of ``node`` without its docstring statement."""
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    assert node.end_lineno is not None
    out = lines[first : node.end_lineno]
    doc = node.body[0]
    assert doc.end_lineno is not None and doc.end_col_offset is not None
    a, b = doc.lineno - 1 - first, doc.end_lineno - 1 - first
    before = _span(out[a], None, doc.col_offset)
    after = _span(out[b], doc.end_col_offset)
    alone = not before.strip() and (not after.strip() or after.lstrip().startswith("#"))
    if alone and len(node.body) > 1:
        return out[:a] + out[b + 1 :]
    if alone:
        newline = out[b][len(out[b].rstrip("\r\n")) :] or "\n"
        return [*out[:a], f"{before}pass{newline}", *out[b + 1 :]]
    return [*out[:a], f"{before}pass{after}", *out[b + 1 :]]


def _dedent(lines: list[str]) -> str:
    """Remove the ``def`` line's indentation from every line that starts with it."""
    first = lines[0]
    indent = first[: len(first) - len(first.lstrip(" \t"))]
    return "".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)


def extract_pairs(
    text: str,
    path: str = "",
    module: str = "",
    *,
    min_docstring_chars: int = 20,
    max_code_chars: int = 4000,
) -> tuple[list[CodePair], Counter[str]]:
    """Extract the code-search pairs of one file.

    Returns:
        The pairs in source order, and skip counts: ``syntax_error`` (file),
        ``short_docstring``, ``too_long``, ``unparseable`` (per function).
    """
    skipped: Counter[str] = Counter()
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        skipped["syntax_error"] += 1
        return [], skipped
    lines = split_lines(text)
    pairs: list[CodePair] = []
    for name, node in _functions(tree):
        docstring = ast.get_docstring(node, clean=True)
        if docstring is None:
            continue
        if len(docstring) < min_docstring_chars:
            skipped["short_docstring"] += 1
            continue
        code = _dedent(_strip_docstring(lines, node))
        if len(code) > max_code_chars:
            skipped["too_long"] += 1
            continue
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):
            skipped["unparseable"] += 1
            continue
        pairs.append(CodePair(docstring, code, name, path, module))
    return pairs, skipped
