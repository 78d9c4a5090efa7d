"""Keep third-party output out of the user's terminal: warnings, library log lines and
progress bars go to a log file (``runs/<run>/<stage>/log.txt``, the server's log ...).

Inside :func:`capture_output`, everything written to ``sys.stderr`` — Python warnings,
the log handlers torch / transformers / bitsandbytes / torchao install, tqdm bars
("Loading weights", "Writing model shards") — lands in the file. modelkiln's own lines
reach the user through :class:`~modelkiln.progress.Progress` (stdout), so they stay.
With :func:`set_verbose` (the CLI's ``--debug`` / ``-v``) the output is also shown.

A few third-party messages matter to the user; :data:`NOTICES` rephrases them in
modelkiln's words, with the fix, and passes them to ``notice`` once per process.

Example:
    >>> with capture_output(Path("runs/x/train/log.txt"), notice=progress.message):
    ...     train(...)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

LOG_FILE = "log.txt"
#: Loggers whose records are modelkiln's own lines (kept on the terminal by
#: :func:`terminal_logging`); every other logger is third-party.
OURS = ("modelkiln", "uvicorn", "__main__")
# (pattern in third-party output, what modelkiln tells the user instead). Import-time noise
# (torchao's "Failed to load _C_mxfp8", bitsandbytes' "gemm_4bit_forward" on every import)
# is left in the log: it says nothing about the run.
NOTICES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"bitsandbytes::\w+: an autograd kernel was not registered"),
        "QLoRA: a 4-bit layer ran a kernel without backward during training, so gradients "
        "may be wrong (fix: report it; modelkiln keeps bitsandbytes on its autograd path)",
    ),
)
_state: dict[str, bool] = {"verbose": False}
_said: set[str] = set()


def set_verbose(verbose: bool) -> bool:
    """Show captured third-party output in the terminal too (``--debug`` / ``-v``).

    Returns the previous setting (to restore it).
    """
    previous = _state["verbose"]
    _state["verbose"] = verbose
    return previous


class _Router(io.TextIOBase):
    """Stands in for ``sys.stderr``: writes go to the innermost capture, else the terminal.

    Installed once and left in place, so handlers and bars created during a capture
    keep a stream that is still valid after it ends.
    """

    def __init__(self, real: TextIO) -> None:
        self.real = real
        self.targets: list[tuple[TextIO, Callable[[str], None] | None]] = []

    def write(self, text: str) -> int:
        if not self.targets:
            return self.real.write(text)
        target, notice = self.targets[-1]
        target.write(text)
        if _state["verbose"]:
            self.real.write(text)
        if notice is not None:
            _notice(text, notice)
        return len(text)

    def flush(self) -> None:
        for target, _ in self.targets[-1:]:
            target.flush()
        self.real.flush()

    def isatty(self) -> bool:
        return not self.targets and self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


def _notice(text: str, notice: Callable[[str], None]) -> None:
    for pattern, message in NOTICES:
        if message not in _said and pattern.search(text):
            _said.add(message)
            notice(message)


def _router() -> _Router:
    """The installed router (installing it on first use)."""
    if not isinstance(sys.stderr, _Router):
        sys.stderr = _Router(sys.stderr)
    router = sys.stderr
    # Handlers made before the router (torch's, transformers') hold the real stderr.
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if (
                isinstance(handler, logging.StreamHandler)
                and handler.stream is router.real
                and not getattr(handler, "kiln_terminal", False)
            ):
                handler.setStream(router)
    return router


class _SplitHandler(logging.Handler):
    """Writes modelkiln's (and uvicorn's) records to the terminal, others to ``sys.stderr``.

    Inside a capture ``sys.stderr`` is the router, so a third-party record that
    propagates to the root logger (bitsandbytes', torchao's) lands in the log file
    while the server's own lines stay on the terminal.
    """

    def __init__(self, terminal: TextIO) -> None:
        super().__init__()
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ours = record.name.split(".", 1)[0] in OURS
            stream = self.terminal if ours else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's own rule: a failed emit must not raise
            self.handleError(record)


@contextlib.contextmanager
def terminal_logging(level: str, fmt: str) -> Iterator[None]:
    """Log through the root logger at ``level`` while inside (the server's process).

    modelkiln's own records (:data:`OURS`) always reach the terminal; other records
    go through ``sys.stderr``, i.e. into the log file while :func:`capture_output` is
    active (and on the terminal too with :func:`set_verbose`).
    """
    real = sys.stderr.real if isinstance(sys.stderr, _Router) else sys.stderr
    handler = _SplitHandler(real)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)


def keep_on_terminal(name: str) -> None:
    """Point the stream handlers of logger ``name`` back at the terminal.

    For handlers a library made from ``sys.stderr`` during a capture (uvicorn's,
    configured when ``uvicorn.Config`` is built): their lines are the server's own.
    """
    if not isinstance(sys.stderr, _Router):
        return
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(sys.stderr.real)
            handler.kiln_terminal = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def capture_output(
    path: Path,
    *,
    notice: Callable[[str], None] | None = None,
    keep_on_error: Path | None = None,
) -> Iterator[Path]:
    """Send third-party stderr output (warnings, log lines, bars) to ``path`` while inside.

    Args:
        path: the log file (appended to; parent folders are created).
        notice: called once per process with modelkiln's rephrasing of a known message.
        keep_on_error: copy the log here when the block raises (its folder may be discarded).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    router = _router()  # warnings.showwarning and tqdm write to sys.stderr when they fire
    with path.open("a", encoding="utf-8", buffering=1) as log:
        router.targets.append((log, notice))
        try:
            yield path
        except BaseException:
            if keep_on_error is not None:
                log.flush()
                with contextlib.suppress(OSError):
                    shutil.copyfile(path, keep_on_error)
            raise
        finally:
            router.targets.remove((log, notice))
