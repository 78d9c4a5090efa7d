"""The markdown section of ``bench_peers.py``: tables of medians and the issue's goals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

DEFAULT, INT8 = "modelkiln default", "modelkiln onnx-int8"


def _f(value: Any, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _errors(figs: list[dict[str, Any]]) -> str:
    """Failed requests, with the HTTP statuses that were not 200 (0: transport error)."""
    bad: dict[str, int] = {}
    for f in figs:
        for status, n in (f.get("statuses") or {}).items():
            if status != "200":
                bad[status] = bad.get(status, 0) + n
    total = sum(f.get("errors") or 0 for f in figs)
    return str(total) + (
        f" ({', '.join(f'{n} x {s}' for s, n in sorted(bad.items()))})" if bad else ""
    )


def _cpu(m: dict[str, Any]) -> str:
    return (f"{_f(m.get('client_cpu_per_request_ms'), 2)} ms/req "
            f"({_f(100 * (m.get('client_cpu_util') or 0), 1)} % of a core)")  # fmt: skip


def _engine(m: dict[str, Any]) -> str:
    """A kiln server's engine: share of the phase it computed, its rate then, batch per step."""
    if m.get("engine_busy_share") is None:
        return "–"
    return (f"{_f(100 * m['engine_busy_share'], 0)} % / {_f(m.get('engine_tokens_per_busy_s'))} "
            f"/ {_f(m.get('engine_mean_batch'), 1)}")  # fmt: skip


def _rounds(figs: list[dict[str, Any]], key: str, digits: int) -> str:
    return " / ".join(_f(f.get(key), digits) for f in figs)


def _goal(label: str, num: float | None, den: float | None, goal: float) -> str:
    if not num or not den:
        return f"- {label}: not measured (a side is missing)"
    r = num / den
    if not goal:
        return f"- {label}: **{r:.2f}x** (recorded beside, no goal)"
    shown = f"{r:.3f}" if abs(r - goal) < 0.01 else f"{r:.2f}"  # 0.898 must not read as 0.90
    return f"- {label}: **{shown}x** (goal >= {goal:g}x): **{'met' if r >= goal else 'missed'}**"


def _emb_table(part: dict[str, Any]) -> str:
    med, rows = part["median"], []
    for name, figs in part["served"].items():
        m = med[name]
        rows.append(
            f"| {name} | **{_f(m.get('throughput_rps'), 1)}** | {_rounds(figs, 'throughput_rps', 1)} "
            f"| {_f(m.get('latency_p50_ms'))} / {_f(m.get('latency_p99_ms'))} "
            f"| {_errors(figs)} | {_cpu(m)} | {_f(part['start_s'].get(name), 1)} |"
        )
    for name, figs in part["offline"].items():
        m = med[name]
        rows.append(
            f"| {name}, batch 32 (forward only; with tokenization {_f(m.get('with_tokenize_sps'), 1)}) "
            f"| **{_f(m.get('forward_sps'), 1)}** | {_rounds(figs, 'forward_sps', 1)} | – | – | – | – |"
        )
    head = ("| setup | req/s (sentences/s offline), median | per round | latency p50 / p99 ms "
            "| errors (all rounds) | client CPU | cold start s |\n|---|---|---|---|---|---|---|")  # fmt: skip
    return head + "\n" + "\n".join(rows)


def _lm_table(part: dict[str, Any]) -> str:
    med, rows = part["median"], []
    for name, figs in part["served"].items():
        m = med[name]
        made = sorted({t for f in figs for t in f.get("tokens_per_request", [])})
        rows.append(
            f"| {name} | **{_f(m.get('output_tokens_per_s'))}** "
            f"| {_rounds(figs, 'output_tokens_per_s', 0)} "
            f"| {_f(m.get('ttft_p50_ms'))} / {_f(m.get('ttft_p95_ms'))} "
            f"| {_f(m.get('tpot_p50_ms'), 1)} | {_f(m.get('itl_p95_ms'), 1)} "
            f"| {_errors(figs)} | {made} | {_cpu(m)} | {_engine(m)} |"
        )
    for name, figs in part["offline"].items():
        rows.append(f"| {name}, static batch | **{_f(med[name].get('output_tokens_per_s'))}** "
                    f"| {_rounds(figs, 'output_tokens_per_s', 0)} | – | – | – | – | – | – | – |")  # fmt: skip
    head = ("| setup | output tok/s, median | per round | TTFT p50 / p95 ms | TPOT p50 ms "
            "| ITL p95 ms | errors (all rounds) | tokens / request | client CPU "
            "| engine busy / tok/s while busy / tokens per step |\n"
            "|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    return head + "\n" + "\n".join(rows)


def _emb_goals(part: dict[str, Any], engine: str | None) -> list[str]:
    med = part["median"]

    def get(name: str, key: str = "throughput_rps") -> float | None:
        return med.get(name, {}).get(key)

    off = {k: v.get("forward_sps") for k, v in med.items() if k.startswith("offline")}
    ort_off = next((v for k, v in off.items() if "ONNX" in k), None)
    own_name, own_off = _engine_offline(engine, off)
    best_served = max((v for v in (get(DEFAULT), get(INT8)) if v), default=None)
    best_off = max((v for v in off.values() if v), default=None)
    inf_name = next((k for k in med if k.startswith("infinity-emb")), "infinity-emb")
    inf = get(inf_name)
    return [
        _goal("served embeddings, best modelkiln server vs best offline engine (any)",
              best_served, best_off, 0.9),
        _goal(f"served embeddings, default server ({engine or '?'}, picked at first start) vs "
              f"the same engine offline ({own_name})", get(DEFAULT), own_off, 0.9),
        _goal("served embeddings, int8 server vs its own engine offline (ORT int8)",
              get(INT8), ort_off, 0.9),
        _goal(f"served embeddings, best modelkiln server vs {inf_name}", best_served, inf, 1.5),
        _goal(f"served embeddings, default server vs {inf_name}", get(DEFAULT), inf, 1.5),
    ]  # fmt: skip


def _lm_goals(part: dict[str, Any], engine: str | None) -> list[str]:
    med = part["median"]

    def get(name: str) -> float | None:
        return med.get(name, {}).get("output_tokens_per_s")

    best_served = max((v for v in (get(DEFAULT), get(INT8)) if v), default=None)
    offline = {k: v.get("output_tokens_per_s") for k, v in med.items() if k.startswith("offline")}
    best_off = max((v for v in offline.values() if v), default=None)
    own_name, own_off = _engine_offline(engine, offline)
    q8 = get("llama-server Q8_0")
    return [
        _goal(f"served completions, default server ({engine or '?'}, picked at first start) vs "
              f"the same engine as a static batch ({own_name})", get(DEFAULT), own_off, 0.9),
        _goal("served completions, int8 server vs the same int8 KV graph as a static batch (ORT)",
              get(INT8), get("offline ORT int8 KV graph"), 0.9),
        _goal("served completions, best modelkiln server vs best offline static batch (any engine)",
              best_served, best_off, 0.9),
        _goal("served completions, best modelkiln server vs llama-server Q8_0", best_served, q8, 1.0),
        _goal("served completions, default server vs llama-server Q8_0", get(DEFAULT), q8, 1.0),
        _goal("CTranslate2 int8 offline vs best modelkiln server",
              get("offline CTranslate2 int8"), best_served, 0.0),
    ]  # fmt: skip


def _machine_load(load: dict[str, Any]) -> str:
    """What the 1-minute load average sampled before each phase says about the machine."""
    span = f"{_f(load.get('min'), 1)}-{_f(load.get('max'), 1)} (mean {_f(load.get('mean'), 1)})"
    if (load.get("mean") or 0.0) <= 2.5:  # this run alone keeps ~2 runnable on 2 cores
        return (f"**Machine otherwise idle**: the 1-minute load average sampled before each "
                f"phase was {span}, which is this run's own servers and client.")  # fmt: skip
    return (
        f"**Machine loaded by other work**: the 1-minute load average sampled before each "
        f"phase was {span}; this run itself adds ~2. Absolute figures are low and noisy."
    )


def _engine_offline(engine: str | None, offline: dict[str, Any]) -> tuple[str, float | None]:
    """The offline row that runs the same engine as the default server (picked at first start)."""
    if engine is None:
        return "?", None
    if engine.startswith("onnx-int8"):
        name = next((k for k in offline if "int8" in k and ("ORT" in k or "ONNX" in k)), "")
    elif engine.startswith("torch"):
        name = next((k for k in offline if "torch" in k or "HF generate" in k), "")
    else:  # onnx-fp32: no offline row of that engine is measured
        name = ""
    return (name or f"{engine} (not measured offline)"), offline.get(name)


def render(result: dict[str, Any]) -> str:
    """The whole ``peers`` section of docs/BENCHMARKS.md (from the run's JSON)."""
    args = SimpleNamespace(**result["options"])
    load = result.get("load_avg_1m") or {}
    peers = "; ".join(
        f"{k}: {v['state']} ({v['detail'][:120]})" for k, v in result["peers"].items()
    )
    skipped = "; ".join(f"{k}: {v[:300]}" for k, v in result["skipped"].items()) or "none"
    parts = [
        f"""## Peers: `kiln serve` vs infinity-emb, llama.cpp `llama-server`, CTranslate2

{result["machine"]} modelkiln at commit `{result["modelkiln_commit"]}`.

Command: `.venv/bin/python benchmarks/bench_peers.py{" " if result["command"].split("bench_peers.py")[1].strip() else ""}{result["command"].split("bench_peers.py")[1].strip()}`
(peers installed first by `bash benchmarks/peers/setup_peers.sh`, into `/work/peers`). Run took {result.get("minutes")} min.

{_machine_load(load)} The ratios
come from {args.rounds} interleaved rounds (server order rotated each round), medians.
The load generator is modelkiln's own (`modelkiln.bench`, closed loop, keep-alive raw HTTP on
httptools) in the benchmark process, sharing the cores with the server under test; its CPU is shown.
Every process runs with `OMP_WAIT_POLICY=PASSIVE`: with spinning worker threads a `kiln serve`
GPT-2 stream ran 6x slower at load 16 (64 tokens in 61.8 s vs 9.8 s; torch's default spins).
Raw results (every round, statuses, server logs): `/work/peers/results/<UTC stamp>/`.

Peers: {peers}. Skipped: {skipped}.
"""
    ]
    if "embeddings" in result:
        e = result["embeddings"]
        parts.append(f"""### Embeddings: all-MiniLM-L6-v2, {args.emb_clients} clients, ~128-token stdlib slices

Each phase sends up to {args.emb_requests} fresh slices (never repeated in the run, so no response
cache answers; a phase stops sending after {args.phase_seconds:g} s), `encoding_format: {args.encoding}`. Servers: `kiln serve --model-path <MiniLM dir>` (defaults; it picked
{(result.get("modelkiln_default_engine") or {}).get("embeddings", "?")} at its first start),
`kiln serve` on the `onnx-int8-dynamic` variant built by the optimize library, and
`infinity_emb v2 --engine torch --dtype {result.get("infinity_dtype", "bfloat16")}` (its other defaults; the
precision modelkiln measured as the faster one on this CPU). Offline: modelkiln's
encoder backends on batches of 32 of the same kind of inputs, no HTTP.

{_emb_table(e)}
""")
    if "completions" in result:
        c = result["completions"]
        prec = result.get("modelkiln_default_lm_precision", "?")
        parts.append(f"""### Completions: GPT-2 {result.get("gpt2_parameters", 0) / 1e6:.1f} M, {args.streams} streams x {args.tokens} new tokens

GPT-2 with 6 layers x 512, vocabulary 16,384 (byte-level BPE trained on the stdlib), random
init, EOS never the greedy choice (so every request makes {args.tokens} tokens; the
"tokens / request" column checks it). Each phase: {args.waves} x {args.streams} requests with fresh
32-token stdlib prompts, greedy, streamed. The default `kiln serve` picked
{(result.get("modelkiln_default_engine") or {}).get("completions", "?")} at its first start
(torch precision auto would be {prec}). llama-server: `-t 2 -np {args.streams} -c {args.streams * 320} -cb`, `ignore_eos: true`
per request. Offline static batches of {args.streams}: HF `generate` at {prec}, the int8
variant's KV graph in ONNX Runtime, CTranslate2 int8 (`compute_type=int8`, 2 threads,
`min_length`=`max_length`={args.tokens}).

{_lm_table(c)}
""")
    goals = []
    engines = result.get("modelkiln_default_engine") or {}
    if "embeddings" in result:
        goals += _emb_goals(result["embeddings"], engines.get("embeddings"))
    if "completions" in result:
        goals += _lm_goals(result["completions"], engines.get("completions"))
    parts.append("### Goals (issue 18, issue 14 part 6)\n\n" + "\n".join(goals) + "\n")
    return "\n".join(parts)
