"""Continuous-batching generation engine vs Hugging Face ``generate`` (no HTTP).

A GPT-2-architecture model built from config (random init: throughput does not
depend on the weights), sized like the quickstart code LM's bigger sibling:
6 layers x 512 wide, vocab 8192 (the quickstart tokenizer's size), prompts cut
from the standard library's sources. Compared side by side in one run:

- the engine: 32 concurrent greedy requests x 128 new tokens, streamed (TTFT,
  inter-token latency p50/p95, tokens/s);
- ``generate`` static batch 32, fp32 (left-padded, 128 new tokens);
- ``generate`` static batch 32, bf16, for reference (few tokens: bf16 matmuls are
  tens of times slower than fp32 on CPUs without AMX / AVX512-BF16);
- ``generate`` one request at a time, fp32 (a subset of the requests), whose
  greedy outputs must equal the engine's token for token.

EOS is ignored everywhere so every request makes exactly its new tokens.
In-process on purpose: ``kiln bench serve`` measures the same engine over HTTP
(``bench_serve_completions.py``); ``generate`` has no server, so this comparison
keeps its own timing of both sides (percentiles from :mod:`modelkiln.stats`).
Results go to the ``generation-engine`` section of docs/BENCHMARKS.md.

    python benchmarks/bench_generation.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads collapse (~15x slower) when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section

from modelkiln.stats import percentile


def build(args: argparse.Namespace) -> tuple[Any, Any, list[list[int]]]:
    """(model, tokenizer, prompts): random-init GPT-2, BPE tokenizer, stdlib prompts."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelkiln.config import TokenizerConfig
    from modelkiln.data.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-m]*.py"))[:60]]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=args.vocab))
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=len(tok),
        n_positions=1024, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    ids = tok.encode("\n".join(texts))
    prompts, start = [], 0
    for i in range(args.requests):
        n = args.min_prompt + (i * 7) % (args.max_prompt - args.min_prompt + 1)
        prompts.append(ids[start : start + n])
        start += n * 13
    return model, tok, prompts


async def run_engine(
    model: Any, tok: Any, prompts: list[list[int]], budgets: list[int]
) -> dict[str, Any]:
    """All requests at once (request i makes ``budgets[i]`` tokens); per-token arrival times."""
    from modelkiln.serve.generation import (
        ContinuousBatchingEngine,
        GenerationRequest,
        SamplingParams,
        TorchCausalLMBackend,
    )

    engine = ContinuousBatchingEngine(
        TorchCausalLMBackend(model), tok, max_num_seqs=len(prompts), max_batched_tokens=4096
    )
    engine.scheduler.eos_token_ids = frozenset()  # every request makes exactly its budget
    await engine.start()

    async def one(i: int, prompt: list[int]) -> tuple[float, list[float], list[int]]:
        submitted = time.perf_counter()
        params = SamplingParams(max_tokens=budgets[i], temperature=0.0)
        times, tokens = [], []
        async for event in engine.generate(GenerationRequest(f"r{i}", prompt, params)):
            times.append(time.perf_counter())
            if event.token_id is not None:
                tokens.append(event.token_id)
        return submitted, times, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    stats = engine.stats()
    await engine.shutdown(drain_timeout=5)
    ttft = [times[0] - sub for sub, times, _ in results]
    itl = [b - a for _, times, _ in results for a, b in itertools.pairwise(times)]
    return {
        "wall": wall,
        "tokens": sum(len(t) for _, _, t in results),
        "ttft": ttft,
        "itl": itl,
        "outputs": [t for _, _, t in results],
        "steps": stats["steps"],
    }


def run_generate(model: Any, tok: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
    """One left-padded static batch through ``model.generate``."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            eos_token_id=None, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    wall = time.perf_counter() - start
    outputs = out[:, width:].tolist()
    return {"wall": wall, "tokens": sum(len(o) for o in outputs), "outputs": outputs}


def decode_step_seconds(model: Any, batch: int, context: int, steps: int) -> float:
    """Median time of one batched decode forward over a ``context``-token cache (no prefill)."""
    import torch
    from transformers import DynamicCache

    cfg = model.config
    shape = (batch, cfg.n_head, context, cfg.n_embd // cfg.n_head)
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.n_layer):
        cache.update(
            torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype), layer
        )
    ids = torch.randint(0, cfg.vocab_size, (batch, 1))
    times = []
    with torch.inference_mode():
        for i in range(steps):
            mask = torch.ones(batch, context + i + 1, dtype=torch.long)
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run every variant, print the table and record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=4, help="requests run one at a time")
    parser.add_argument("--bf16-steps", type=int, default=3, help="decode steps timed in bf16")
    parser.add_argument("--fp32-steps", type=int, default=15, help="decode steps timed in fp32")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    import torch

    t0 = time.perf_counter()
    model, tok, prompts = build(args)
    new = args.new_tokens
    run_generate(model, tok, prompts[:2], 4)  # warm-up
    engine = asyncio.run(run_engine(model, tok, prompts, [new] * len(prompts)))
    static = run_generate(model, tok, prompts, new)
    # Mixed budgets: the engine frees a finished slot at once; a static batch runs to the longest.
    budgets = [new // 8 + (new - new // 8) * (i % 8) // 7 for i in range(len(prompts))]
    mixed = asyncio.run(run_engine(model, tok, prompts, budgets))
    mixed_static = run_generate(model, tok, prompts, max(budgets))
    mixed_static["tokens"] = sum(budgets)  # the useful ones
    singles = [run_generate(model, tok, [p], new) for p in prompts[: args.sequential]]
    same = sum(s["outputs"][0] == engine["outputs"][i] for i, s in enumerate(singles))
    context = sum(len(p) for p in prompts) // len(prompts) + new // 2  # mean cache length
    fp32_step = decode_step_seconds(model, len(prompts), context, args.fp32_steps)
    bf16_step = decode_step_seconds(
        model.to(torch.bfloat16), len(prompts), context, args.bf16_steps
    )
    total = time.perf_counter() - t0

    def tps(r: dict[str, Any]) -> float:
        return r["tokens"] / r["wall"]

    seq_tps = sum(s["tokens"] for s in singles) / sum(s["wall"] for s in singles)
    rows = [
        ("engine, continuous batching, fp32", tps(engine), f"{engine['wall']:.1f}"),
        (f"HF generate, static batch {len(prompts)}, fp32", tps(static), f"{static['wall']:.1f}"),
        (f"HF forward, batch {len(prompts)} decode steps only, fp32", len(prompts) / fp32_step, ""),
        (f"HF forward, batch {len(prompts)} decode steps only, bf16", len(prompts) / bf16_step, ""),
        (f"HF generate, one at a time, fp32 ({len(singles)} requests)", seq_tps, ""),
    ]
    mixed_rows = [
        ("engine, continuous batching, fp32", tps(mixed), f"{mixed['wall']:.1f}"),
        (
            f"HF generate, static batch {len(prompts)}, fp32 (runs to the longest)",
            tps(mixed_static),
            f"{mixed_static['wall']:.1f}",
        ),
    ]
    table = [
        "| variant | tokens/s | wall s | engine speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {v:.0f} | {w} | {tps(engine) / v:.2f}x |" for n, v, w in rows),
    ]
    mixed_table = [
        "| variant | useful tokens/s | wall s | engine speed-up |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {v:.0f} | {w} | {tps(mixed) / v:.2f}x |" for n, v, w in mixed_rows),
    ]
    ttft, itl = engine["ttft"], engine["itl"]
    command = shlex.join(["python", "benchmarks/bench_generation.py", *sys.argv[1:]])
    md = "\n".join(
        [
            "## Generation engine (continuous batching, no HTTP)",
            "",
            f"Command: `{command}`",
            "",
            machine_line(),
            f"Model: GPT-2 architecture, {args.layers} layers x {args.width} wide, vocab"
            f" {len(tok)}, random init ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
            f" params); {len(prompts)} concurrent greedy requests, prompts"
            f" {args.min_prompt}-{args.max_prompt} tokens of stdlib source, {new} new tokens each"
            f" (EOS ignored); torch threads {torch.get_num_threads()}.",
            "",
            *table,
            "",
            f"Engine latency: TTFT p50 {percentile(ttft, 50) * 1e3:.0f} ms, p95"
            f" {percentile(ttft, 95) * 1e3:.0f} ms (all {len(prompts)} arrive at once and"
            f" are prefilled in the first step); inter-token latency p50"
            f" {percentile(itl, 50) * 1e3:.1f} ms, p95 {percentile(itl, 95) * 1e3:.1f} ms,"
            f" mean {statistics.fmean(itl) * 1e3:.1f} ms; {engine['steps']:.0f} engine steps.",
            f"Mixed lengths: the same {len(prompts)} prompts with budgets {min(budgets)}-{max(budgets)}"
            f" new tokens (mean {statistics.fmean(budgets):.0f}); a static batch must run to the"
            " longest and throw the surplus away:",
            "",
            *mixed_table,
            "",
            f"Greedy parity: {same}/{len(singles)} engine outputs identical to one-at-a-time"
            " `generate`.",
            'The two "decode steps only" rows time the model\'s batched decode forward on a'
            f" {context}-token cache (the run's mean), without prefill or sampling (median step):"
            " roughly the ceiling for `generate` at that precision. bf16 is timed that way because a full bf16"
            " `generate` run takes many minutes here: on a CPU without AMX / AVX512-BF16 (this"
            " one) bf16 matmuls are far slower than fp32, which is why `precision: auto` picks"
            " fp32 on it.",
            f"Whole benchmark: {total:.0f} s.",
        ]
    )
    print(md)
    if not args.no_record:
        update_section("generation-engine", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
