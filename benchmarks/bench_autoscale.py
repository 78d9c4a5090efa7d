"""Predictive (Holt-Winters + M/M/c) vs reactive (HPA-like) autoscaling on a seeded
synthetic trace: share of requests within the p95 target and replica-seconds.

    python benchmarks/bench_autoscale.py [--days 5] [--seed 0]
"""

from __future__ import annotations

import argparse

from modelkiln.deploy.autoscale_backtest import compare


def main() -> None:
    """Print one line per policy and the predictive / reactive replica-seconds ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results = compare(days=args.days, train_days=3, seed=args.seed)
    for r in results:
        print(f"{r.policy:<10} within target {r.within_target:.2%}  "
              f"replica-seconds {r.replica_seconds:,.0f}  peak replicas {r.max_replicas}")  # fmt: skip
    reactive, predictive = results
    print(
        f"predictive / reactive replica-seconds: {predictive.replica_seconds / reactive.replica_seconds:.3f}"
    )


if __name__ == "__main__":
    main()
