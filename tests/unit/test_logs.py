"""Third-party output goes to the log file; modelkiln's own lines and known notices stay."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelkiln import logs


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """Start quiet whatever an earlier test (``kiln --debug ...``) left set."""
    previous = logs.set_verbose(False)
    yield
    logs.set_verbose(previous)


def test_warnings_log_lines_and_bars_go_to_the_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    handler = logging.StreamHandler(sys.stderr)  # as torch / transformers install theirs
    lib = logging.getLogger("some_library")
    lib.addHandler(handler)
    said: list[str] = []
    try:
        with logs.capture_output(tmp_path / "log.txt", notice=said.append):
            # What warnings.showwarning does outside pytest (pytest records warnings itself).
            sys.stderr.write(warnings.formatwarning("x is deprecated", FutureWarning, "f.py", 1))
            lib.warning("There were missing keys in the checkpoint")
            sys.stderr.write("Loading weights: 100%|##########| 20/20\n")
            lib.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
            sys.stderr.write("bitsandbytes::gemv_4bit: an autograd kernel was not registered\n")
            sys.stderr.write("bitsandbytes::gemv_4bit: an autograd kernel was not registered\n")
            print("modelkiln's own line")
    finally:
        lib.removeHandler(handler)
    text = (tmp_path / "log.txt").read_text()
    for line in ("FutureWarning: x is deprecated", "missing keys", "Loading weights", "gemm_4bit"):
        assert line in text
    out, err = capfd.readouterr()
    assert "modelkiln's own line" in out
    assert "missing keys" not in err and "Loading weights" not in err
    assert len(said) == 1 and "gradients may be wrong" in said[0]  # once, in modelkiln words
    sys.stderr.write("after\n")  # outside a capture: the terminal again
    assert "after" in capfd.readouterr().err


def test_verbose_also_shows_them_and_errors_keep_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logs.set_verbose(True)
    try:
        with logs.capture_output(tmp_path / "a" / "log.txt"):
            sys.stderr.write("third-party line\n")
    finally:
        logs.set_verbose(False)
    assert "third-party line" in capfd.readouterr().err
    kept = tmp_path / "kept.txt"
    with (
        pytest.raises(RuntimeError),
        logs.capture_output(tmp_path / "b" / "log.txt", keep_on_error=kept),
    ):
        sys.stderr.write("before the crash\n")
        raise RuntimeError("stage failed")
    assert "before the crash" in kept.read_text()


def test_server_logging_keeps_its_own_lines_and_uvicorns_on_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    uvicorn_log = logging.getLogger("uvicorn")
    with (
        logs.terminal_logging("info", "%(name)s: %(message)s"),
        logs.capture_output(tmp_path / "serve.log"),
    ):
        # As uvicorn.Config does: a handler made from sys.stderr during the capture.
        handler = logging.StreamHandler(sys.stderr)
        uvicorn_log.addHandler(handler)
        uvicorn_log.propagate = False
        try:
            logs.keep_on_terminal("uvicorn")
            uvicorn_log.warning("Uvicorn running on http://127.0.0.1:1")
            logging.getLogger("modelkiln.serve.state").info("ready: serving lm")
            logging.getLogger("bitsandbytes.cextension").warning("gemm_4bit_forward")
        finally:
            uvicorn_log.removeHandler(handler)
            uvicorn_log.propagate = True
    err = capfd.readouterr().err
    assert "Uvicorn running" in err and "modelkiln.serve.state: ready: serving lm" in err
    assert "gemm_4bit_forward" not in err
    text = (tmp_path / "serve.log").read_text()
    assert "bitsandbytes.cextension: gemm_4bit_forward" in text
    assert "Uvicorn running" not in text and "ready: serving" not in text
