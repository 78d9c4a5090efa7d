"""Corpus walking, exclusion, reading, deduplication and the split by top-level module."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from modelkiln.config import DEFAULT_EXCLUDES
from modelkiln.data.corpus import (
    SPLITS,
    assign_splits,
    count_lines,
    count_tokens,
    list_sources,
    module_of,
    read_corpus,
    resolve_source,
    split_score,
)
from modelkiln.errors import DataError


def write(root: Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write(root, "alpha.py", "def a():\n    return 1\n")
    write(root, "copy_of_alpha.py", "def a():\n    return 1\n")
    write(root, "beta.py", "x = 1  # one\n")
    write(root, "gamma/__init__.py", "from .core import g\n")
    write(root, "gamma/core.py", "def g():\n    pass\n")
    write(root, "gamma/sub/deep.py", "y = 2\n")
    write(root, "gamma/tests/check.py", "z = 3\n")
    write(root, "gamma/test_gamma.py", "import gamma\n")
    write(root, "test/regr.py", "t = 1\n")
    write(root, "site-packages/evil.py", "e = 1\n")
    write(root, "__pycache__/cached.py", "c = 1\n")
    write(root, "notes.txt", "not python\n")
    write(root, "latin.py", "s = 'caf\xe9'\n".encode("latin-1"))
    write(root, "empty.py", "  \n")
    write(root, "big.py", "b = 1\n" * 100)
    return root


def test_exclusion_drops_test_suites_site_packages_and_caches(tree: Path) -> None:
    paths = list_sources(tree, DEFAULT_EXCLUDES)
    assert paths == sorted(paths)
    assert paths == [
        "alpha.py", "beta.py", "big.py", "copy_of_alpha.py", "empty.py",
        "gamma/__init__.py", "gamma/core.py", "gamma/sub/deep.py", "latin.py",
    ]  # fmt: skip


def test_stdlib_mode_drops_site_packages_even_if_not_excluded(tree: Path) -> None:
    write(tree, "not-a-package/x.py", "x = 1\n")
    paths = list_sources(tree, [], stdlib=True)
    assert "site-packages/evil.py" not in paths
    assert "not-a-package/x.py" not in paths
    assert "test/regr.py" in paths
    assert "site-packages/evil.py" in list_sources(tree, [])


def test_module_of() -> None:
    assert module_of("email/mime/text.py") == "email"
    assert module_of("json/__init__.py") == "json"
    assert module_of("os.py") == "os"


def test_read_skips_and_removes_duplicates(tree: Path) -> None:
    scan = read_corpus(tree, list_sources(tree, DEFAULT_EXCLUDES), max_file_bytes=200)
    kept = [f.path for f in scan.files]
    assert kept == ["alpha.py", "beta.py", "gamma/__init__.py", "gamma/core.py",
                    "gamma/sub/deep.py"]  # fmt: skip
    assert scan.duplicates_removed == 1  # copy_of_alpha.py, the later path
    assert scan.skipped == {"too_large": 1, "not_utf8": 1, "empty": 1}
    beta = scan.files[1]
    assert (beta.module, beta.text, beta.n_lines, beta.n_bytes) == ("beta", "x = 1  # one\n", 1, 13)
    assert beta.n_tokens == 3
    assert {f.module for f in scan.files} == {"alpha", "beta", "gamma"}


def test_max_files_counts_kept_files(tree: Path) -> None:
    paths = list_sources(tree, DEFAULT_EXCLUDES)
    scan = read_corpus(tree, paths, max_file_bytes=200, max_files=3)
    assert [f.path for f in scan.files] == ["alpha.py", "beta.py", "gamma/__init__.py"]


def test_token_and_line_counts() -> None:
    assert count_tokens("x = f(1)  # c\n\nif x:\n    pass\n") == 10
    assert count_tokens('s = """never closed\n') is None
    assert count_lines("a\nb") == 2
    assert count_lines("a\nb\n") == 2
    assert count_lines("") == 0


def test_tokenize_fallback_counts_words(tmp_path: Path) -> None:
    write(tmp_path, "bad.py", 's = """never closed\n')
    scan = read_corpus(tmp_path, ["bad.py"])
    assert scan.tokenize_fallback == 1
    assert scan.files[0].n_tokens == 4


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope") as info:
        resolve_source(str(tmp_path / "nope"))
    assert info.value.hint


def test_split_assignment_is_deterministic_and_near_fractions() -> None:
    modules = [f"mod{i}" for i in range(2000)]
    first = assign_splits(modules, "salt", 0.1, 0.05)
    assert first == assign_splits(reversed(modules), "salt", 0.1, 0.05)
    counts = {s: sum(1 for v in first.values() if v == s) for s in SPLITS}
    assert 150 < counts["validation"] < 250
    assert 60 < counts["test"] < 140
    assert first != assign_splits(modules, "other salt", 0.1, 0.05)
    assert all(0 <= split_score(m, "salt") < 1 for m in modules[:50])


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_small_corpora_get_every_wanted_split(n: int) -> None:
    modules = [f"m{i}" for i in range(n)]
    for salt in ("a", "b", "c", "d"):
        split_of = assign_splits(modules, salt, 0.05, 0.05)
        assert set(split_of.values()) == set(SPLITS)
        assert split_of == assign_splits(modules, salt, 0.05, 0.05)


def test_tiny_or_unwanted_splits_stay_train() -> None:
    assert assign_splits(["only"], "s", 0.3, 0.3) == {"only": "train"}
    assert set(assign_splits([f"m{i}" for i in range(50)], "s", 0.0, 0.0).values()) == {"train"}


def test_no_module_or_file_in_two_splits_on_fake_tree(tmp_path: Path) -> None:
    for i in range(12):
        write(tmp_path, f"pkg{i}/__init__.py", f"a = {i}\n")
        write(tmp_path, f"pkg{i}/inner/m.py", f"b = {i}\n")
        write(tmp_path, f"mod{i}.py", f"c = {i}\n")
    paths = list_sources(tmp_path, DEFAULT_EXCLUDES)
    split_of = assign_splits({module_of(p) for p in paths}, "s", 0.2, 0.2)
    assert_disjoint(paths, split_of)


def test_no_module_or_file_in_two_splits_on_real_stdlib() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = list_sources(root, DEFAULT_EXCLUDES, stdlib=True)
    assert len(paths) > 300
    assert not [p for p in paths if {"site-packages", "test", "tests"} & set(p.split("/"))]
    assert "json/__init__.py" in paths and "email/mime/text.py" in paths
    split_of = assign_splits({module_of(p) for p in paths}, "modelkiln", 0.05, 0.05)
    assert_disjoint(paths, split_of)


def assert_disjoint(paths: list[str], split_of: dict[str, str]) -> None:
    files = {s: {p for p in paths if split_of[module_of(p)] == s} for s in SPLITS}
    modules = {s: {module_of(p) for p in files[s]} for s in SPLITS}
    assert all(files[s] for s in SPLITS)
    assert sum(len(f) for f in files.values()) == len(set(paths)) == len(paths)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not files[a] & files[b]
                assert not modules[a] & modules[b]
