"""SIGKILL in the middle of a stage write: nothing loadable is left, a re-run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modelkiln.artifacts import load_artifact
from modelkiln.errors import ArtifactError

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from modelkiln import pipeline
    from modelkiln.config import PipelineConfig
    from modelkiln.pipeline import StageSpec, run_pipeline

    def quick(ctx):
        (ctx.out / "a.txt").write_text("a")

    def slow(ctx):
        for i in range(1000):
            (ctx.out / f"part-{i}.bin").write_bytes(b"x" * 1000)
            if i == 5:
                Path(sys.argv[2]).write_text("mid-write")
            if sys.argv[3] == "slow":
                time.sleep(0.05)
        ctx.metrics["parts"] = 1000

    pipeline.STAGES = {
        "data": StageSpec("data", "__main__:quick"),
        "tokenizer": StageSpec("tokenizer", "__main__:slow", requires=("data",)),
    }
    cfg = PipelineConfig(run="r", runs_dir=Path(sys.argv[1]), stages=["data", "tokenizer"])
    result = run_pipeline(cfg)
    print(" ".join(f"{o.stage}:{o.status}" for o in result.outcomes))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_mid_write_leaves_nothing_loadable_and_rerun_resumes(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "marker"
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(script), str(runs), str(marker), "slow"])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the stage finished or crashed before it could be killed"
        assert time.monotonic() < deadline, "the stage never started writing"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    run_dir = runs / "r"
    assert load_artifact(run_dir / "data").manifest.stage == "data"
    assert not (run_dir / "tokenizer").exists()
    leftovers = [p for p in run_dir.iterdir() if p.name.startswith(".tmp-tokenizer-")]
    assert leftovers, "the killed write should have been in a temporary directory"
    with pytest.raises(ArtifactError):
        load_artifact(leftovers[0])

    done = subprocess.run(
        [sys.executable, str(script), str(runs), str(marker), "fast"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["data:cached", "tokenizer:ran"]
    assert load_artifact(run_dir / "tokenizer").metrics == {"parts": 1000}
    assert not any(p.name.startswith(".tmp-") for p in run_dir.iterdir())
