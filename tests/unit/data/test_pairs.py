"""Code-search pair extraction: docstring removed, code parses, methods/async, filters."""

from __future__ import annotations

import ast
import textwrap

from modelkiln.data.pairs import CodePair, extract_pairs, split_lines

SOURCE = (
    '''\
import functools


@functools.cache
def add_one(x):
    """Return x plus one.

    Detail line.
        Indented detail line.
    """
    # keep this comment
    return x + 1


class Box:
    def get(self):
        """Return the thing that the box holds."""

    async def fetch(self, url):  # network
        """Fetch a URL asynchronously and return its body."""  # why
        text = """
raw text at column zero
"""
        return text

    class Inner:
        def deep(self):
            """A method of a nested class, long enough."""
            return 1


def one_liner(): "A docstring sharing its line with code."; return 2


def outer():
    """The outer function has a long docstring."""
    def inner():
        """The inner function has a docstring too."""
        return 3
    return inner


def short():
    """Too short."""
    return 0


def nodoc():
    return 5


def huge():
    """A function whose body is far too long."""
'''
    + "    x = 1\n" * 500
)


def pairs_by_name(**kw: int) -> dict[str, CodePair]:
    pairs, _ = extract_pairs(SOURCE, "pkg/mod.py", "pkg", **kw)
    return {p.name: p for p in pairs}


def test_names_include_methods_async_nested() -> None:
    names = list(pairs_by_name(min_docstring_chars=20))
    assert names == [
        "add_one", "Box.get", "Box.fetch", "Box.Inner.deep", "one_liner", "outer",
        "outer.<locals>.inner",
    ]  # fmt: skip


def test_docstring_removed_and_code_parses() -> None:
    pairs, _ = extract_pairs(SOURCE, "pkg/mod.py", "pkg", min_docstring_chars=20)
    for pair in pairs:
        tree = ast.parse(textwrap.dedent(pair.code))
        func = tree.body[0]
        assert isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        if pair.name != "outer":  # outer still contains inner's docstring
            assert pair.docstring not in pair.code
        assert ast.get_docstring(func) is None
        assert (pair.path, pair.module) == ("pkg/mod.py", "pkg")


def test_code_details() -> None:
    pairs = pairs_by_name(min_docstring_chars=20)
    add_one = pairs["add_one"]
    assert add_one.code == (
        "@functools.cache\ndef add_one(x):\n    # keep this comment\n    return x + 1\n"
    )
    assert add_one.docstring == "Return x plus one.\n\nDetail line.\n    Indented detail line."
    assert pairs["Box.get"].code == "def get(self):\n    pass\n"
    fetch = pairs["Box.fetch"].code
    assert fetch.startswith("async def fetch(self, url):  # network\n    text =")
    assert "\nraw text at column zero\n" in fetch
    assert pairs["one_liner"].code == "def one_liner(): pass; return 2\n"


def test_filters() -> None:
    assert "short" in pairs_by_name(min_docstring_chars=5)
    _, skipped = extract_pairs(SOURCE, min_docstring_chars=20, max_code_chars=400)
    assert skipped["short_docstring"] == 1
    assert skipped["too_long"] == 1
    assert "huge" in pairs_by_name(min_docstring_chars=20, max_code_chars=100_000)


def test_syntax_error_file_is_counted() -> None:
    pairs, skipped = extract_pairs("def broken(:\n")
    assert pairs == []
    assert skipped == {"syntax_error": 1}


def test_line_numbers_survive_form_feeds() -> None:
    text = 'x = 1\x0c\n\ndef f():\n    """A docstring after a form feed line."""\n    return 1\n'
    assert len(split_lines(text)) == 5
    pairs, _ = extract_pairs(text)
    assert pairs[0].code == "def f():\n    return 1\n"


def test_functions_inside_blocks_are_found_in_source_order() -> None:
    text = textwrap.dedent(
        '''
        try:
            def in_try():
                """Defined inside a try block body."""
        except ImportError:
            def in_except():
                """Defined inside an except handler."""
        else:
            def in_else():
                """Defined inside the else of the try."""
        if True:
            def in_if():
                """Defined inside an if statement."""
        match 1:
            case 1:
                def in_case():
                    """Defined inside a match case body."""
        f = lambda: None
        '''
    )
    pairs, _ = extract_pairs(text)
    assert [p.name for p in pairs] == ["in_try", "in_except", "in_else", "in_if", "in_case"]
