"""Code-LM ``/v1/completions`` under load: modelkiln's server vs a naive server vs offline.

Model: the quickstart's Llama ``small`` preset (4 layers, width 256, 4 heads, 512
positions) randomly initialised (seed 0) with a byte-level BPE tokenizer (8192
tokens) trained on this Python's standard library — the size ``kiln quickstart``
trains, without the training (speed does not depend on the weights). The EOS
row of the output layer is zeroed so no request stops early: every side
generates exactly ``--tokens`` tokens per request (same work everywhere).
Prompts: ``--clients`` different 32-token slices of stdlib source files.

Compared side by side in one run (interleaved rounds, medians):

- ``python -m modelkiln.serve`` (continuous batching, ``max_num_seqs`` =
  ``--clients``) twice: on the HF directory (torch fp32 backend) and on the
  ``onnx-int8-dynamic`` variant built from it (ONNX Runtime backend, its
  ``model_kv.onnx``), streaming ``/v1/completions`` driven by
  :mod:`modelkiln.bench` (closed loop: ``--clients`` concurrent streams;
  open loop: Poisson arrivals at fractions of the closed-loop rate);
- modelkiln's generation engine in-process (both backends), no HTTP, the same
  requests submitted at once (separates the engine's speed from the HTTP path);
- (a) naive server: a sync FastAPI endpoint calling HF ``generate`` once per
  request (FastAPI's thread pool runs concurrent requests in parallel threads;
  the whole completion is sent when done, so its TTFT is its latency);
- (b) HF ``generate`` on one static batch of ``--clients`` left-padded prompts,
  offline (no HTTP), fp32 and bf16 (bf16 matmuls are very slow on AVX2-only
  CPUs, so bf16 runs ``--bf16-tokens`` tokens only and its rate is per token);
- (b') the best offline engine here: a greedy static-batch loop over the int8
  variant's ``model_kv.onnx`` in ONNX Runtime.

The load generator (:mod:`modelkiln.bench`: keep-alive HTTP/1.1 on httptools) runs in this process and shares the two
cores with the server under test; the offline runs have the machine alone.

    python benchmarks/bench_serve_completions.py          # ~6-10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from _servers import free_port, spawn, stop

PROMPT_TOKENS = 32


# ----------------------------------------------------------------------- model
def build_model(out: Path) -> Path:
    """The quickstart-size random Llama + stdlib tokenizer, saved with save_pretrained."""
    import torch

    from modelkiln.config import TokenizerConfig
    from modelkiln.data.tokenizer import save_tokenizer, train_tokenizer
    from modelkiln.train.config import ModelConfig
    from modelkiln.train.models import build_scratch_model

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[::2]]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=8192))
    torch.manual_seed(0)
    model = build_scratch_model(ModelConfig(source="scratch", architecture="llama", size="small"),
                                tok).eval()  # fmt: skip
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id].zero_()
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def stdlib_files() -> list[Path]:
    """Python files of the standard library, in a fixed order."""
    root = Path(os.__file__).parent
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 4000)


def make_prompts(model_dir: Path, count: int) -> list[str]:
    """``count`` texts of PROMPT_TOKENS tokens (+-2 after decoding), sliced from stdlib files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts: list[str] = []
    for path in stdlib_files()[1::2]:
        ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        for start in range(100, len(ids) - PROMPT_TOKENS, 500):
            text = str(tok.decode(ids[start : start + PROMPT_TOKENS]))
            if abs(len(tok(text)["input_ids"]) - PROMPT_TOKENS) <= 2:
                prompts.append(text)
            if len(prompts) == count:
                return prompts
    raise RuntimeError("not enough stdlib files for the prompts")


# --------------------------------------------------------------------- offline
def offline_static(model_dir: Path, prompts: list[str], tokens: int, dtype: str) -> float:
    """Seconds of one HF ``generate`` call on all prompts as one left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
          "pad_token_id": tok.pad_token_id}  # fmt: skip
    with torch.inference_mode():
        model.generate(**{k: v[:2] for k, v in enc.items()}, **(kw | {"max_new_tokens": 2,
                                                                      "min_new_tokens": 2}))  # fmt: skip
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        seconds = time.perf_counter() - t0
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return seconds


def build_int8_variant(model_dir: Path, out: Path) -> Path:
    """``onnx-int8-dynamic`` of the model, as ``kiln optimize`` builds it (with model_kv.onnx)."""
    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import inspect_model, load_torch_model, synthetic_batch

    spec = inspect_model(model_dir, "causal-lm")
    samples = [synthetic_batch(spec, 2, 32, seed=i) for i in range(2)]
    ctx = BuildContext(spec, load_torch_model(spec), OptimizeConfig(), samples, [])
    built = build_variant("onnx-int8-dynamic", ctx, out, samples)
    assert built.info["kv_cache"], built.info
    return out


def offline_ort(variant_dir: Path, prompts: list[str], tokens: int) -> float:
    """Seconds of a greedy static-batch loop over ``model_kv.onnx`` in ONNX Runtime (no HTTP)."""
    import numpy as np
    from transformers import AutoTokenizer

    from modelkiln.optimize.kv_export import KV_ONNX, OrtKvGenerator

    tok = AutoTokenizer.from_pretrained(str(variant_dir), padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(prompts, return_tensors="np", padding=True)
    gen = OrtKvGenerator(variant_dir / KV_ONNX, threads=2)
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    gen.step(ids[:2, -4:], mask[:2, -4:], gen.empty_past(2))  # warm up
    t0 = time.perf_counter()
    logits, past = gen.step(ids, mask, gen.empty_past(len(prompts)))
    made = 0
    while True:
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        made += 1
        if made == tokens:
            break
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = gen.step(nxt, mask, past)
    return time.perf_counter() - t0


def engine_only(model_dir: Path, prompts: list[str], tokens: int, tag: str,
                backend: Literal["torch", "onnx"] = "torch") -> float:  # fmt: skip
    """Seconds for modelkiln's generation engine, in-process (no HTTP), on all prompts at once."""
    import asyncio

    from modelkiln.serve.generation import (
        ContinuousBatchingEngine,
        GenerationRequest,
        SamplingParams,
    )

    async def run() -> float:
        engine = ContinuousBatchingEngine.from_path(
            model_dir, max_num_seqs=len(prompts), threads=2, backend=backend
        )
        await engine.start()
        tok = engine.tokenizer
        params = SamplingParams(tokens, temperature=0.0)

        async def one(i: int) -> int:
            request = GenerationRequest(f"{tag}-{i}", tok(prompts[i])["input_ids"], params)
            return sum([e.token_id is not None async for e in engine.generate(request)])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        seconds = time.perf_counter() - t0
        await engine.shutdown(5)
        assert sum(counts) == tokens * len(prompts)
        return seconds

    return asyncio.run(run())


# ----------------------------------------------------------------------- naive
def naive_server(model_dir: str, port: int) -> None:
    """The baseline: a sync FastAPI endpoint calling HF generate once per request."""
    import json

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(body: dict[str, Any]) -> Response:
        ids = tok(body["prompt"], return_tensors="pt")["input_ids"]
        n = int(body["max_tokens"])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :]
        text = tok.decode(new)
        chunk = {"choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": ids.shape[1],
                                          "completion_tokens": int(new.numel())}}  # fmt: skip
        # Not streamed: the whole completion arrives at once (TTFT = latency).
        sse = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        return Response(sse, media_type="text/event-stream")

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------- processes


# ------------------------------------------------------------------------ main
def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    """Run every side in interleaved rounds, print and record the section."""
    from modelkiln.bench import SLO, run_load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent streams / batch size")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--waves", type=int, default=2, help="closed loop: requests = waves x clients")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.9],
                   help="open-loop rates as fractions of the closed-loop req/s")  # fmt: skip
    p.add_argument("--open-requests", type=int, default=48, help="requests per open-loop run")
    p.add_argument("--bf16-tokens", type=int, default=8, help="tokens of the bf16 offline run")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=150.0)
    p.add_argument("--naive-server", nargs=2, metavar=("DIR", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.naive_server:
        naive_server(args.naive_server[0], int(args.naive_server[1]))
        return 0
    import torch

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-lm-"))
    model_dir = build_model(tmp / "code-lm")
    int8_dir = build_int8_variant(model_dir, tmp / "code-lm-int8")
    prompts = make_prompts(model_dir, args.clients)
    slo = SLO(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    port, ort_port, naive_port = free_port(), free_port(), free_port()

    def serve_cmd(path: Path, at: int) -> list[str]:
        return [sys.executable, "-m", "modelkiln.serve", "--model-path", str(path),
                "--name", "lm", "--port", str(at), "--log-level", "warning", "--threads", "2",
                "--set", f"generation.max_num_seqs={args.clients}",
                "--set", "cache.enabled=false"]  # fmt: skip

    naive_cmd = [sys.executable, __file__, "--naive-server", str(model_dir), str(naive_port)]
    # Started one after the other: idle servers cost nothing, and cold starts do not overlap.
    proc, _ = spawn(serve_cmd(model_dir, port), f"http://127.0.0.1:{port}")
    ort_proc, _ = spawn(serve_cmd(int8_dir, ort_port), f"http://127.0.0.1:{ort_port}")
    naive_proc, _ = spawn(naive_cmd, f"http://127.0.0.1:{naive_port}")
    common: dict[str, Any] = {"model": "lm", "max_tokens": args.tokens}
    total = args.clients * args.tokens
    runs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("served_ort", "served", "naive", "fp32", "ort", "engine_ort", "engine")
    }
    for i in range(args.rounds):
        s = offline_static(model_dir, prompts, args.tokens, "float32")
        runs["fp32"].append({"output_tokens_per_s": total / s, "seconds": s})
        s = offline_ort(int8_dir, prompts, args.tokens)
        runs["ort"].append({"output_tokens_per_s": total / s, "seconds": s})
        s = engine_only(int8_dir, prompts, args.tokens, f"o{i}", backend="onnx")
        runs["engine_ort"].append({"output_tokens_per_s": total / s, "seconds": s})
        s = engine_only(model_dir, prompts, args.tokens, f"r{i}")
        runs["engine"].append({"output_tokens_per_s": total / s, "seconds": s})
        for key, at in (("served_ort", ort_port), ("served", port)):
            rep = run_load(f"http://127.0.0.1:{at}", prompts, concurrency=args.clients,
                           num_requests=args.clients * args.waves, **common)  # fmt: skip
            runs[key].append(rep.summary(slo))
        rep = run_load(f"http://127.0.0.1:{naive_port}", prompts, concurrency=args.clients,
                       num_requests=args.clients, **common)  # fmt: skip
        runs["naive"].append(rep.summary(slo))
        print(f"round {i + 1}: " + ", ".join(
            f"{k} {r[-1]['output_tokens_per_s']:.0f} tok/s" for k, r in runs.items()), flush=True)  # fmt: skip
    stop(naive_proc)
    exit_code = stop(proc)
    closed_rps = median_of(runs["served_ort"], "throughput_rps") or 1.0
    open_runs = []
    for frac in args.rates:
        rate = round(frac * closed_rps, 2)
        rep = run_load(f"http://127.0.0.1:{ort_port}", prompts, rate=rate, seed=0,
                       num_requests=args.open_requests, **common)  # fmt: skip
        open_runs.append((frac, rep.summary(slo)))
        print(f"open loop {rate} req/s: {open_runs[-1][1]['output_tokens_per_s']:.0f} tok/s",
              flush=True)  # fmt: skip
    exit_code = max(exit_code, stop(ort_proc))
    bf16_s = offline_static(model_dir, prompts, args.bf16_tokens, "bfloat16")
    bf16 = args.clients * args.bf16_tokens / bf16_s
    md = report(args, runs, open_runs, bf16, exit_code)
    print(md)
    if not args.no_record:
        update_section("serve-completions", md)
    return 0


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           open_runs: list[tuple[float, dict[str, Any]]], bf16: float, exit_code: int) -> str:  # fmt: skip
    """The markdown section."""
    command = "python benchmarks/bench_serve_completions.py " + shlex.join(
        a for a in (sys.argv[1:] or []) if a != "--no-record"
    )

    def med(key: str) -> float:
        return median_of(runs[key], "output_tokens_per_s") or float("nan")

    served, served_torch, naive = med("served_ort"), med("served"), med("naive")
    fp32, ort, engine_ort, engine = med("fp32"), med("ort"), med("engine_ort"), med("engine")

    def ratios(tps: float) -> str:
        return f"{tps / naive:.1f}x | {tps / fp32:.2f}x | {tps / ort:.2f}x"

    def row(name: str, rs: list[dict[str, Any]], streamed: bool = True) -> str:
        tps = median_of(rs, "output_tokens_per_s") or 0.0
        tpot = (f"{_ms(median_of(rs, 'tpot_p50_ms'))} / {_ms(median_of(rs, 'tpot_p95_ms'))}"
                if streamed else "n/a (not streamed)")  # fmt: skip
        return (f"| {name} | {tps:.0f} | {median_of(rs, 'throughput_rps'):.2f} "
                f"| {_ms(median_of(rs, 'ttft_p50_ms'))} / {_ms(median_of(rs, 'ttft_p95_ms'))} "
                f"| {tpot} "
                f"| {_ms(median_of(rs, 'itl_p95_ms'))} | {median_of(rs, 'goodput_rps'):.2f} "
                f"| {sum(r['errors'] for r in rs)} | {ratios(tps)} |")  # fmt: skip

    def offline(name: str, tps: float) -> str:
        return f"| {name} | {tps:.0f} | - | - | - | - | - | - | {ratios(tps)} |"

    open_rows = "\n".join(
        f"| {s['mode']} ({frac:g} x closed-loop rate) | {s['output_tokens_per_s']:.0f} "
        f"| {s['throughput_rps']:.2f} | {_ms(s['ttft_p50_ms'])} / {_ms(s['ttft_p95_ms'])} "
        f"| {_ms(s['tpot_p50_ms'])} / {_ms(s['tpot_p95_ms'])} | {_ms(s['itl_p95_ms'])} "
        f"| {s['goodput_rps']:.2f} | {s['errors']} |"
        for frac, s in open_runs
    )
    per_round = ", ".join(
        f"{k} {[round(r['output_tokens_per_s']) for r in rs]}" for k, rs in runs.items()
    )
    goals = [
        ("served >= 1.5x HF generate static batch (fp32: the fastest HF dtype here)",
         served >= 1.5 * fp32),
        ("served >= 10x naive", served >= 10 * naive),
    ]  # fmt: skip
    c, t = args.clients, args.tokens
    return f"""## Serving: code LM `/v1/completions`, {c} concurrent streams x {t} new tokens

{machine_line()}

Command: `{command.strip()}`

Model: the quickstart's Llama `small` preset (4 layers, width 256, ~5 M parameters), random
init, 8192-token stdlib BPE tokenizer; EOS never sampled, so every request makes exactly
{t} tokens. Served two ways: the Hugging Face directory on the torch backend (fp32), and the
`onnx-int8-dynamic` variant that `kiln optimize` builds from it (ONNX Runtime dynamic int8,
with its KV-cache graph `model_kv.onnx`), which the server runs on its ONNX Runtime backend.
Prompts: {c} different {PROMPT_TOKENS}-token stdlib slices; greedy. Closed loop ({c} streams,
{args.waves} x {c} requests per round for our servers, {c} for the naive one), the engines
in-process and the offline static batches run in {args.rounds} interleaved rounds; medians
below. Per round (output tok/s): {per_round}. SLO for goodput: TTFT <= {args.slo_ttft_ms:g} ms
and TPOT <= {args.slo_tpot_ms:g} ms. The load generator runs in the benchmark process and
shares the 2 cores with the server under test; the offline runs have the machine alone.
1-minute load average when the run ended: {os.getloadavg()[0]:.1f}.

| Setup | out tok/s | req/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | ITL p95 ms | goodput req/s | errors | vs naive | vs HF static fp32 | vs ORT int8 static |
|---|---|---|---|---|---|---|---|---|---|---|
{row("modelkiln serve, onnx-int8-dynamic variant (ONNX Runtime backend)", runs["served_ort"])}
{row("modelkiln serve, HF directory (torch fp32 backend)", runs["served"])}
{row("naive FastAPI + HF generate per request (not streamed)", runs["naive"], False)}
{offline(f"modelkiln engine in-process, ONNX Runtime int8, {c} requests at once", engine_ort)}
{offline(f"modelkiln engine in-process, torch fp32, {c} requests at once", engine)}
{offline(f"HF generate, static batch of {c}, fp32, offline", fp32)}
{offline(f"ORT int8 KV graph, greedy static batch of {c}, offline (best offline engine)", ort)}
{offline(f"HF generate, static batch of {c}, bf16, offline ({args.bf16_tokens} tokens only)", bf16)}

Open loop (Poisson arrivals, seed 0, {args.open_requests} requests each) on the ONNX Runtime server:

| Arrivals | out tok/s | req/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | ITL p95 ms | goodput req/s | errors |
|---|---|---|---|---|---|---|---|
{open_rows}

Reading: over HTTP the ONNX Runtime server makes {served / engine_ort:.2f}x its engine's
in-process rate and the torch server {served_torch / engine:.2f}x its engine's; the engine on
ONNX Runtime makes {engine_ort / ort:.2f}x the offline static batch on the same graph. Both
servers exited with code {exit_code} after SIGTERM (clean drain). bf16 is measured on
{args.bf16_tokens} tokens only: this CPU has AVX2 but no AVX-512-BF16/AMX, so bf16 matmuls fall
back to slow kernels and fp32 is HF's fastest dtype here; the goal's "static-batch bf16"
baseline is therefore taken in fp32 (bf16 would be {served / bf16:.0f}x, a meaningless win).

Goals (issue 5): {"; ".join(f"{g}: {'met' if ok else 'NOT met'}" for g, ok in goals)}.
"""


if __name__ == "__main__":
    sys.exit(main())
