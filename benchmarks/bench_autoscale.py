"""Predictive (Holt-Winters + M/M/c) vs reactive (HPA-like) autoscaling on seeded synthetic
traces, each policy tuned on its own tuning seeds and scored on held-out seeds.

    python benchmarks/bench_autoscale.py                       # ~1-2 min (pure simulation)
    python benchmarks/bench_autoscale.py --startup-steps 3     # replicas take 15 min to start
    python benchmarks/bench_autoscale.py --burst-scale 0       # what-if: no bursts

Besides the per-seed table it prints the burst-blind bound (a policy that knows everything
but when bursts start, tuned the same way) and where the held-out replays' extra
replica-seconds and late requests go (by part of the day, calm vs burst steps).
"""

from __future__ import annotations

import argparse

from modelkiln.deploy.autoscale_tune import Scenario, render_markdown, run_study


def main() -> None:
    """Print the tuned settings and the per-seed table (markdown)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--goal", type=float, default=0.99, help="share of requests within target")
    p.add_argument("--startup-steps", type=int, default=1, help="5-minute steps to start")
    p.add_argument("--burst-scale", type=float, default=1.0, help="0: no bursts")
    p.add_argument("--bound-without-noise", action="store_true",
                   help="the burst-blind bound knows the calm pattern but not the noise")  # fmt: skip
    args = p.parse_args()
    scenario = Scenario(startup_steps=args.startup_steps, burst_scale=args.burst_scale,
                        bound_knows_noise=not args.bound_without_noise)  # fmt: skip
    study = run_study(args.tune_seeds, args.eval_seeds, args.goal, scenario)
    print(render_markdown(study))
    print("forecast error (RMS, req/s) per seed:",
          {k: round(v, 2) for k, v in study.sigma.items()})  # fmt: skip


if __name__ == "__main__":
    main()
