"""Progress reporting without a UI dependency.

Library code reports through a :class:`Progress` object; the CLI passes one
that draws rich progress bars, tests and library users get the quiet default
(which logs). Library code never imports rich.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("modelkiln")


class Progress:
    """Quiet progress sink: logs task starts and messages at INFO level.

    Subclass and override :meth:`start`, :meth:`advance`, :meth:`finish` and
    :meth:`message` to render progress (the CLI does, with rich).
    """

    def start(self, task: str, total: float | None = None) -> None:
        """Begin a task of ``total`` units (``None`` when unknown)."""
        log.info("%s ...", task)

    def advance(self, task: str, amount: float = 1.0) -> None:
        """Record ``amount`` units of progress on ``task``."""

    def finish(self, task: str) -> None:
        """Mark ``task`` as done."""

    def message(self, text: str) -> None:
        """Show one line of information to the user."""
        log.info("%s", text)

    def track(self, items: Iterable[T], task: str, total: int | None = None) -> Iterator[T]:
        """Iterate over ``items`` while reporting one unit per item."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.start(task, total)
        try:
            for item in items:
                yield item
                self.advance(task)
        finally:
            self.finish(task)


QUIET = Progress()
