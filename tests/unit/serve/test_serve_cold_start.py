"""The cold-start clock: a process's age is read to ~10 ms, not psutil's whole-second boot time."""

from __future__ import annotations

import subprocess
import sys
import time

from modelkiln.serve.server import process_age, process_started


def test_process_age_of_a_fresh_process_is_its_real_age() -> None:
    code = (
        "import time; time.sleep(0.6); from modelkiln.serve.server import process_age; "
        "print(process_age())"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.monotonic() - t0
    age = float(out.stdout.strip())
    assert 0.6 <= age <= wall + 0.02, (age, wall)


def test_process_started_is_in_the_past_of_this_clock() -> None:
    started = process_started()
    assert started <= time.monotonic()
    assert abs((time.monotonic() - started) - process_age()) < 0.05
