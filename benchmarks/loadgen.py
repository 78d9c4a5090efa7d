"""Command-line front end of :mod:`modelkiln.bench` (the library the serve stage uses).

    python benchmarks/loadgen.py http://127.0.0.1:8000 --model lm --concurrency 8 -n 64
    python benchmarks/loadgen.py http://127.0.0.1:8000 --model lm --rate 2 --duration 30
    python benchmarks/loadgen.py http://127.0.0.1:8000 --model minilm --kind embeddings -c 16 -n 256

Prints the summary (p50/p95/p99 TTFT, TPOT, ITL, latency; throughput; goodput under
``--slo-ttft-ms`` / ``--slo-tpot-ms``) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from modelkiln.bench import SLO, LoadReport, RequestResult, percentile, run_load

__all__ = ["SLO", "LoadReport", "RequestResult", "main", "percentile", "run_load"]

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    'def read_json(path):\n    """Load a JSON file."""\n',
]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the load, print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--kind", choices=["completions", "embeddings"], default="completions")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("-c", "--concurrency", type=int, help="closed loop: concurrent clients")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("-n", "--num-requests", type=int, help="requests to send")
    p.add_argument("--duration", type=float, help="seconds to keep sending")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", action="append", help="prompt (repeatable; default: code stubs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--api-key")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    args = p.parse_args(argv)
    if args.num_requests is None and args.duration is None:
        args.num_requests = 32
    report = run_load(
        args.url,
        args.prompt or DEFAULT_PROMPTS,
        kind=args.kind,
        model=args.model,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        rate=args.rate,
        num_requests=args.num_requests,
        duration_s=args.duration,
        seed=args.seed,
        api_key=args.api_key,
    )
    slo = SLO(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    json.dump(report.summary(slo), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
