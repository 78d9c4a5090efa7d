"""``kiln profile``: torch.profiler trace + top ops + memory analysis on a tiny BERT, ORT's
profiler on an ONNX variant, and py-spy on a running process (or its exact refusal)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from http_helpers import tiny_encoder_dir
from test_offline import tiny_onnx_dir
from typer.testing import CliRunner

from modelkiln.bench.profiling import profile_model, profile_server
from modelkiln.cli import app
from modelkiln.errors import ConfigError, EnvironmentCheckError


def test_torch_trace_top_ops_and_memory_analysis(tmp_path: Path) -> None:
    out = tmp_path / "prof"
    res = CliRunner().invoke(
        app,
        [
            "profile",
            str(tiny_encoder_dir()),
            "--batch",
            "2",
            "--seq",
            "8",
            "--steps",
            "2",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the model's ops are in the trace
    data = json.loads((out / "profile.json").read_text())
    assert data["backend"] == "torch" and data["top_ops"][0]["self_ms"] > 0
    mem = data["memory"]
    assert mem["adam_state_mb"] == pytest.approx(2 * mem["params_mb"])  # fp32: Adam = 2x
    assert mem["grads_mb"] == pytest.approx(mem["params_mb"])
    layers = mem["activations_per_layer_mb"]
    assert {"encoder.layer.0", "encoder.layer.1"} <= set(layers) and min(layers.values()) > 0
    assert mem["estimated_step_growth_mb"] == pytest.approx(
        mem["grads_mb"] + mem["adam_state_mb"] + mem["activations_mb"]
    )
    assert mem["measured_step_growth_mb"] >= 0
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        profile_model(tiny_encoder_dir(), tmp_path / "x", seq=65)


def test_onnx_variant_gets_onnx_runtimes_profiler(tmp_path: Path) -> None:
    res = profile_model(tiny_onnx_dir(tmp_path / "v"), tmp_path / "p", batch=2, seq=4, steps=2)
    assert res["backend"] == "onnx" and "memory" not in res
    events = json.loads(Path(res["trace"]).read_text())
    assert isinstance(events, list) and any(e.get("cat") == "Node" for e in events)
    assert {r["name"] for r in res["top_ops"]} >= {"Gather", "Mul"}


def test_server_flame_graph_through_a_shell_wrapper_or_the_exact_refusal(tmp_path: Path) -> None:
    # The pid is a shell wrapper (like `$!` of `sh -c 'python ...' &`): py-spy alone says
    # "Failed to find python version"; kiln samples the Python child through it.
    loop = "import time\nt = time.time()\nwhile time.time() - t < 60: sum(range(99))"
    wrapper = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c '{loop}'; true"])
    try:
        time.sleep(0.5)
        res = CliRunner().invoke(
            app, ["profile", "--pid", str(wrapper.pid), "--seconds", "1", "-o", str(tmp_path)]
        )
        if res.exit_code != 0:  # sandboxes without ptrace access: the exact refusal
            assert "py-spy could not sample process" in res.output and "ptrace" in res.output
        else:
            assert f"sampled process {wrapper.pid} 'sh'" in res.output
            assert (tmp_path / "flame.svg").read_text().lstrip().startswith("<?xml")
            info = json.loads((tmp_path / "flame.json").read_text())
            assert info["pid"] == wrapper.pid and "'sh'" in info["process"]
            assert len(info["python_pids"]) == 1 and info["python_pids"][0] != wrapper.pid
    finally:
        for child in psutil.Process(wrapper.pid).children(recursive=True):
            child.kill()
        wrapper.kill()
        wrapper.wait()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(EnvironmentCheckError, match="is 'sleep' .*not a Python interpreter"):
            profile_server("http://127.0.0.1:1", tmp_path, seconds=1, pid=sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(ConfigError, match="no process on this machine"):
        profile_server("http://127.0.0.1:1", tmp_path)


def test_an_idle_process_gets_the_idle_error_and_is_sampled_with_idle(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline()  # interpreter is up
        try:
            profile_server(None, tmp_path / "a", seconds=1, pid=sleeper.pid)
        except EnvironmentCheckError as exc:
            if "ptrace" in str(exc.hint):  # sandboxes without ptrace access
                pytest.skip(f"py-spy cannot attach here: {exc}")
            assert "no Python code ran there" in str(exc) and "--idle" in str(exc.hint)
        else:
            raise AssertionError("a sleeping process gave py-spy stacks without --idle")
        svg = profile_server(None, tmp_path / "b", seconds=1, pid=sleeper.pid, idle=True)
        assert "sleep" in svg.read_text()
        assert json.loads((svg.parent / "flame.json").read_text())["idle_threads"] is True
    finally:
        sleeper.kill()
        sleeper.wait()
