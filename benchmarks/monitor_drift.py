"""Drift-test power / false-positive table and online calibration of the monitor (seeded).

    .venv/bin/python benchmarks/monitor_drift.py --trials 50 --out runs/bench/monitor_drift.json

Power table: every registered test x scenario x n (per side), share of seeded trials flagged
at the test's default threshold. Online: a 10,000-request stream without drift through
DriftMonitor (window 500, check every 250, target 1e-4 false alarms per request) counts
false alarms; then a 0.5 sigma mean shift on one feature reports the detection delay.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from modelkiln.monitor.online import DriftMonitor, MonitorConfig
from modelkiln.monitor.power import power_table
from modelkiln.monitor.profile import FeatureData, load_profile, write_profile


def online(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    feats = {f"x{i}": FeatureData("num", "request", rng.normal(0, 1, 5000)) for i in range(4)}
    with tempfile.TemporaryDirectory() as tmp:
        prof = load_profile(write_profile(Path(tmp) / "p", feats, model_name="m", model_hash="h"))
    cfg = MonitorConfig(window=500, check_every_requests=250)
    mon = DriftMonitor({"m": prof}, cfg)
    alarms = 0

    def feed(shift: float) -> bool:
        row = {f"x{i}": rng.normal(shift if i == 0 else 0.0, 1) for i in range(4)}
        mon.observe_features("m", "1", row)
        return bool(mon.check()) and any(s.drifted for s in mon.states())

    for _ in range(10_000):
        alarms += feed(0.0)
    delay = None
    for i in range(1, 2001):
        if feed(0.5):
            delay = i
            break
    tests = sorted({s.test for s in mon.states()})
    return {"no_drift_requests": 10_000, "false_alarms": alarms, "checks": mon.checks,
            "shift_0.5_sigma_detected_after_requests": delay, "window": 500, "tests": tests}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--ns", default="100,1000,10000")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/monitor_drift.json"))
    args = ap.parse_args()
    t0 = time.time()
    rows = power_table(tuple(int(n) for n in args.ns.split(",")), args.trials)
    result = {"trials": args.trials, "power": rows, "online": online(), "seconds": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ns = sorted({r["n"] for r in rows})
    print("| test | scenario | " + " | ".join(f"n={n}" for n in ns) + " |")
    print("|---|---|" + "---|" * len(ns))
    for test, scenario in dict.fromkeys((r["test"], r["scenario"]) for r in rows):
        rates = {r["n"]: r["rate"] for r in rows if (r["test"], r["scenario"]) == (test, scenario)}
        print(f"| {test} | {scenario} | " + " | ".join(f"{rates[n]:.2f}" for n in ns) + " |")
    print(json.dumps(result["online"]))


if __name__ == "__main__":
    main()
