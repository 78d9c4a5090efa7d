"""``python -m modelkiln.serve`` keeps third-party output off the terminal (issue 10).

A real server process loads a tiny GPT-2 whose checkpoint carries one extra
tensor, so transformers prints its load report (a real third-party warning path,
next to torchao / torch / bar output on import). The terminal shows modelkiln's
and uvicorn's lines; the report lands in ``--log-file``; ``--debug`` shows it too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
from serve_support import free_port, save_tiny_gpt2, start_process

PROBE = "kiln_probe.weight"  # the extra tensor transformers reports as UNEXPECTED
THIRD_PARTY = (PROBE, "LOAD REPORT", "Loading weights", "FutureWarning", "torchao", "_pytree")


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    path = save_tiny_gpt2(tmp_path_factory.mktemp("quiet") / "model")
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    tensors[PROBE] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def _serve_once(model: Path, log_file: Path, *extra: str) -> str:
    """Start the server, answer one completion, drain; the terminal output (stdout+stderr)."""
    port = free_port()
    args = ["--model-path", str(model), "--precision", "fp32", "--log-file", str(log_file)]
    proc = start_process([*args, *extra], port, timeout=180)
    try:
        body = {"model": "model", "prompt": "def f", "max_tokens": 2}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    return out


def test_third_party_output_goes_to_the_log_file(noisy_model: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "serve.log"
    out = _serve_once(noisy_model, log_file)
    assert f"third-party output: {log_file}" in out
    for marker in THIRD_PARTY:
        assert marker not in out, f"{marker!r} leaked to the terminal:\n{out}"
    text = log_file.read_text()
    assert PROBE in text and "UNEXPECTED" in text and "--- modelkiln.serve pid" in text
    # The server's own records stay on the terminal only.
    assert not re.search(r" (INFO|WARNING|ERROR) (modelkiln|uvicorn)\b", text), text


def test_debug_also_shows_it_on_the_terminal(noisy_model: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "serve.log"
    out = _serve_once(noisy_model, log_file, "--debug")
    assert PROBE in out
    assert PROBE in log_file.read_text()


def test_an_unwritable_log_file_is_one_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelkiln.serve.__main__ import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--model-path", "m", "--log-file", str(blocker / "serve.log")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the log file") and "--log-file PATH" in err
