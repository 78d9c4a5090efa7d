"""Request texts cut from the standard library's own sources, fresh for every phase.

Each phase of the benchmark takes the next unused slices, so no text is ever sent
twice in one run and a server's response cache cannot answer from memory.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (tests and vendored packages left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3")
    return sorted(
        p for p in root.rglob("*.py")
        if not any(part in skip for part in p.relative_to(root).parts) and p.stat().st_size > 2000
    )  # fmt: skip


class Slices:
    """Endless distinct source slices of ``tokens`` tokens (no special tokens) for one tokenizer.

    The slice is the original text between the first and last token's offsets, so it
    reads as real code; re-tokenized it comes within a token or two of ``tokens``.
    """

    def __init__(self, tokenizer: Any, tokens: int, files: list[Path], stride: int | None = None):
        self.tok = tokenizer
        self.tokens = tokens
        self.stride = stride or tokens
        self.files = files
        self.seen: set[str] = set()
        self._it = self._generate()

    def _generate(self) -> Iterator[str]:
        for path in self.files:
            text = path.read_text(encoding="utf-8", errors="replace")
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True,
                           verbose=False)  # fmt: skip
            offsets = enc["offset_mapping"]
            for start in range(0, len(offsets) - self.tokens, self.stride):
                piece = text[offsets[start][0] : offsets[start + self.tokens - 1][1]].strip()
                if len(piece) > self.tokens and piece not in self.seen:
                    self.seen.add(piece)
                    yield piece

    def take(self, n: int) -> list[str]:
        """The next ``n`` unused slices."""
        out = [s for _, s in zip(range(n), self._it, strict=False)]
        if len(out) < n:
            raise RuntimeError(f"the stdlib corpus ran out of {self.tokens}-token slices")
        return out
