"""The code corpus: find, filter, read, deduplicate and split Python source files.

Pure logic (no ``datasets``, no torch) so every rule is testable on a tiny tree:

* :func:`list_sources` walks the source root in sorted order and drops every
  path that an ``exclude`` pattern matches. Each pattern is matched with
  :func:`fnmatch.fnmatchcase` against every path component (directories and
  the file name), so ``tests`` drops a directory and ``test_*.py`` a file.
* :func:`read_corpus` reads the survivors in that order, skipping files over
  ``max_file_bytes``, not valid UTF-8, or empty (whitespace only), and drops
  exact duplicates (sha256 of the bytes) globally, keeping the first path.
  ``max_files`` counts files *kept*, so it yields exactly N when N exist.
* :func:`assign_splits` puts every top-level module into one split, so no
  module (and therefore no file) is in two splits.

For ``source: stdlib`` the root is ``sysconfig.get_paths()["stdlib"]`` (the
base interpreter's, also inside a venv), and ``site-packages`` plus top-level
directories that are not importable names (``config-3.11-...``) are always
left out, whatever ``exclude`` says.

Example:
    >>> root = resolve_source("stdlib")
    >>> scan = read_corpus(root, list_sources(root, ["test", "tests"], stdlib=True), max_files=9)
    >>> splits = assign_splits({f.module for f in scan.files}, "salt", 0.1, 0.1)
"""

from __future__ import annotations

import hashlib
import io
import os
import sysconfig
import token
import tokenize
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from modelkiln.errors import DataError
from modelkiln.progress import QUIET, Progress

SPLITS = ("train", "validation", "test")
#: Never part of the standard library, whatever ``exclude`` says.
STDLIB_NEVER = ("site-packages", "dist-packages")
#: Token types left out of ``n_tokens``: layout, comments and stream markers.
#: What remains is NAME, OP, NUMBER, STRING (and f-string parts, ERRORTOKEN).
UNCOUNTED_TOKENS = frozenset(
    getattr(token, name)
    for name in ("ENCODING", "ENDMARKER", "NL", "NEWLINE", "INDENT", "DEDENT", "COMMENT")
)


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: where it came from, its split unit, its text and sizes."""

    path: str
    module: str
    text: str
    n_lines: int
    n_bytes: int
    n_tokens: int


@dataclass
class CorpusScan:
    """The files kept by :func:`read_corpus` and what was dropped on the way."""

    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    duplicates_removed: int = 0
    tokenize_fallback: int = 0


def resolve_source(source: str) -> Path:
    """Turn ``DataConfig.source`` into a directory.

    Raises:
        DataError: the directory does not exist.
    """
    if source == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.source {source!r} is not a directory",
            hint="set data.source to 'stdlib' or to an existing directory of .py files",
        )
    return root


def is_excluded(parts: Iterable[str], patterns: Iterable[str]) -> bool:
    """True when any pattern matches any path component (``fnmatchcase``)."""
    pats = list(patterns)
    return any(fnmatchcase(part, pat) for part in parts for pat in pats)


def _stdlib_skips(rel_dir: str, name: str) -> bool:
    # In the stdlib root only importable packages count: this drops
    # site-packages and build leftovers such as config-3.11-x86_64-linux-gnu.
    return name in STDLIB_NEVER or (rel_dir == "." and not name.isidentifier())


def list_sources(root: Path, exclude: Iterable[str], *, stdlib: bool = False) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of the ``.py`` files not excluded.

    Args:
        root: directory to walk (symlinked directories are not followed).
        exclude: patterns matched against every path component.
        stdlib: also drop site-packages and non-package directories at the top.
    """
    patterns = list(exclude)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d
            for d in dirnames
            if not is_excluded([d], patterns) and not (stdlib and _stdlib_skips(rel_dir, d))
        ]
        for name in filenames:
            if name.endswith(".py") and not is_excluded([name], patterns):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                found.append(Path(rel).as_posix())
    return sorted(found)


def module_of(path: str) -> str:
    """The split unit of a relative path: its top-level module or package.

    Example:
        >>> module_of("email/mime/text.py"), module_of("json/__init__.py"), module_of("os.py")
        ('email', 'json', 'os')
    """
    parts = PurePosixPath(path).parts
    return parts[0] if len(parts) > 1 else PurePosixPath(path).stem


def count_lines(text: str) -> int:
    """Number of lines, counting a last line without newline."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def count_tokens(text: str) -> int | None:
    """Count Python lexical tokens except layout, comments and markers; None if untokenizable."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        return sum(1 for tok in tokens if tok.type not in UNCOUNTED_TOKENS)
    except (tokenize.TokenError, SyntaxError):
        return None


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_corpus(
    root: Path,
    paths: list[str],
    *,
    max_file_bytes: int = 500_000,
    max_files: int | None = None,
    progress: Progress = QUIET,
) -> CorpusScan:
    """Read ``paths`` (in order) into :class:`SourceFile` records, filtering and deduplicating.

    Skip reasons (counted in ``skipped``): ``too_large``, ``not_utf8``, ``empty``.
    Exact duplicates keep the first path and count in ``duplicates_removed``.
    A file the tokenizer rejects gets a whitespace-split token count instead
    and counts in ``tokenize_fallback``.
    """
    scan = CorpusScan()
    seen: set[str] = set()
    for rel in progress.track(paths, "reading corpus"):
        if max_files is not None and len(scan.files) >= max_files:
            break
        file = root / rel
        if file.stat().st_size > max_file_bytes:
            scan.skipped["too_large"] += 1
            continue
        raw = file.read_bytes()
        text = _decode(raw)
        if text is None:
            scan.skipped["not_utf8"] += 1
            continue
        if not text.strip():
            scan.skipped["empty"] += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            scan.duplicates_removed += 1
            continue
        seen.add(digest)
        n_tokens = count_tokens(text)
        if n_tokens is None:
            scan.tokenize_fallback += 1
            n_tokens = len(text.split())
        scan.files.append(
            SourceFile(rel, module_of(rel), text, count_lines(text), len(raw), n_tokens)
        )
    return scan


def split_score(module: str, salt: str) -> float:
    """Map ``sha256(salt + module)`` to a number in [0, 1)."""
    digest = hashlib.sha256((salt + module).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _intervals(validation: float, test: float) -> dict[str, tuple[float, float]]:
    return {
        "validation": (0.0, validation),
        "test": (validation, validation + test),
        "train": (validation + test, 1.0),
    }


def assign_splits(
    modules: Iterable[str], salt: str, validation_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Assign every module to one split by its :func:`split_score`.

    Scores in ``[0, v)`` go to validation, ``[v, v + t)`` to test, the rest to
    train. Small corpora can leave a split empty; then, in the order train,
    validation, test (the latter two only when their fraction is > 0), an empty
    split takes one module from the largest split holding >= 2 modules (train
    may also take a donor's only module): the donor's module whose score lies
    nearest to the empty split's interval, ties broken by name. With >= 3
    modules every wanted split ends up non-empty.
    """
    spans = _intervals(validation_fraction, test_fraction)
    scores = {m: split_score(m, salt) for m in sorted(set(modules))}
    split_of = {
        m: next((s for s, (lo, hi) in spans.items() if lo <= score < hi), "train")
        for m, score in scores.items()
    }
    wanted = ["train"] + [
        s for s, frac in (("validation", validation_fraction), ("test", test_fraction)) if frac > 0
    ]
    for target in wanted:
        members = {s: sorted(m for m, sp in split_of.items() if sp == s) for s in SPLITS}
        if members[target]:
            continue
        need = 1 if target == "train" else 2
        donors = [s for s in SPLITS if s != target and len(members[s]) >= need]
        if not donors:
            continue
        donor = max(donors, key=lambda s: len(members[s]))
        lo, hi = spans[target]
        moved = min(members[donor], key=lambda m: (max(lo - scores[m], scores[m] - hi, 0.0), m))
        split_of[moved] = target
    return split_of
