"""Structured FFN pruning of all-MiniLM-L6-v2: throughput speed-up and code-search quality.

50% of every layer's FFN neurons are removed (``prune-structured``: cubic schedule, recovery by
feature distillation toward the dense model on stdlib docstring / code texts, no labels); the
pruned directory is reloaded with ``AutoModel.from_pretrained``. Speed: batch 32 x 128 tokens,
fp32, dense and pruned timed in interleaved rounds (median). Quality: code-search MRR@10 on
held-out stdlib docstring -> code pairs (the same miner and hash split as
bench_code_search.py), for the dense model, the pruned model without recovery (one shot) and
the pruned model with recovery. Writes the ``prune-minilm`` section of docs/BENCHMARKS.md.

    python benchmarks/bench_prune_minilm.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads collapse (~15x slower) when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _record import machine_line, update_section
from bench_code_search import mine_stdlib


def train_batches(
    rows: list[dict[str, str]], tokenizer: Any, n: int, size: int, max_length: int
) -> list[Any]:
    """``n`` tokenized batches of ``size`` texts (docstrings and code mixed, seeded shuffle)."""
    texts = [r["docstring"] for r in rows] + [r["code"] for r in rows]
    random.Random(0).shuffle(texts)
    out = []
    for i in range(n):
        chunk = texts[i * size : (i + 1) * size]
        enc = tokenizer(
            chunk, max_length=max_length, truncation=True, padding=True, return_tensors="pt"
        )
        out.append(dict(enc))
    return out


def time_models(models: dict[str, Any], batch: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Interleaved timing rounds (order alternating); median seconds per forward, per model."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(**batch)
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                started = time.perf_counter()
                models[name](**batch)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the summary as JSON; update docs/BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500, help="held-out pairs for MRR@10")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of top modules")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of FFN neurons cut")
    parser.add_argument("--criterion", default="taylor", choices=["l1", "l2", "taylor"])
    parser.add_argument("--taylor-batches", type=int, default=8, help="Taylor score batches")
    parser.add_argument("--steps", type=int, default=3, help="cubic schedule steps")
    parser.add_argument("--recovery-steps", type=int, default=20, help="per schedule step")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    parser.add_argument("--batches", type=int, default=64, help="training batches")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per training batch")
    parser.add_argument("--train-len", type=int, default=64, help="tokens per training text")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)

    import datasets
    import torch
    from transformers import AutoModel, AutoTokenizer

    from modelkiln.optimize.api import build_variant
    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.registry import BuildContext
    from modelkiln.optimize.runners import inspect_model, load_torch_model
    from modelkiln.train.encoder import evaluate_code_search, minilm_path, pair_texts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_prune_minilm")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_rows, eval_rows, n_held = mine_stdlib(args.held_out)
    docs, codes = pair_texts(datasets.Dataset.from_list(eval_rows), args.pairs, seed=0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = inspect_model(path, "encoder")
    dense = load_torch_model(spec)
    train = train_batches(train_rows, tokenizer, args.batches, args.batch_size, args.train_len)
    samples = train_batches(eval_rows[:16], tokenizer, 1, 8, 128)  # parity check inputs only

    def mrr(model: Any) -> float:
        m = evaluate_code_search(model, tokenizer, docs, codes, 10, batch_size=32, max_length=128)
        return float(m["mrr@10"])

    prune = {
        "method": "structured",
        "structure": "ffn",
        "target_sparsity": args.sparsity,
        "criterion": args.criterion,
        "taylor_batches": args.taylor_batches,
        "schedule_steps": args.steps,
        "recovery_steps": args.recovery_steps,
        "recovery_lr": args.lr,
    }
    oneshot = prune | {"schedule_steps": 1, "recovery_steps": 0}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for label, pcfg in (("one-shot", oneshot), ("recovered", prune)):
            t0 = time.perf_counter()
            ctx = BuildContext(spec, dense, OptimizeConfig(prune=pcfg), samples, train)
            built[label] = build_variant("prune-structured", ctx, Path(tmp) / label, samples)
            results[label] = {"build_s": round(time.perf_counter() - t0, 1)}
            log.info("%s built in %.0f s", label, results[label]["build_s"])
        # Reloaded from the saved directories with plain transformers.
        models = {"dense": dense}
        models |= {k: AutoModel.from_pretrained(b.path).eval() for k, b in built.items()}
        for name, model in models.items():
            results.setdefault(name, {})["mrr@10"] = mrr(model)
            results[name]["params"] = sum(p.numel() for p in model.parameters())
            log.info("%s MRR@10 %.4f", name, results[name]["mrr@10"])
        timing = tokenizer(
            [r["code"] for r in train_rows[:32]],
            max_length=128,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        medians = time_models(
            {"dense": dense, "pruned": models["recovered"]}, dict(timing), args.rounds
        )
        info = built["recovered"].info
        parity = built["recovered"].parity.ok
    speedup = medians["dense"] / medians["pruned"]
    base = results["dense"]["mrr@10"]
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "pairs": len(codes),
        "held_out_modules": n_held,
        "train_texts": sum(len(b["input_ids"]) for b in train),
        "ms_per_batch": {k: round(v * 1000, 1) for k, v in medians.items()},
        "items_per_s": {k: round(32 / v, 1) for k, v in medians.items()},
        "speedup": round(speedup, 3),
        "mrr": {k: round(v["mrr@10"], 4) for k, v in results.items()},
        "mrr_ratio": {k: round(v["mrr@10"] / base, 4) for k, v in results.items()},
        "params": {k: v["params"] for k, v in results.items()},
        "build_s": {k: v.get("build_s") for k, v in results.items()},
        "prune": info["prune"],
        "history": info["prune_history"],
        "parity_ok": parity,
        "args": vars(args),
    }
    print(json.dumps(summary, indent=2, default=str))
    if not args.no_record:
        command = shlex.join(["python", "benchmarks/bench_prune_minilm.py", *sys.argv[1:]])
        update_section("prune-minilm", render(summary, command))
    return 0


def render(s: dict[str, Any], command: str) -> str:
    """The markdown section of this benchmark."""
    a, p = s["args"], s["prune"]
    speed_ok = "meets" if s["speedup"] >= 1.4 else "misses"
    quality_ok = "meets" if s["mrr_ratio"]["recovered"] >= 0.97 else "misses"
    rows = [
        ("dense (fp32)", "dense", "dense"),
        ("50% FFN, one shot, no recovery", "one-shot", "-"),
        (f"50% FFN, {a['steps']}-step cubic + recovery", "recovered", "pruned"),
    ]
    table = "\n".join(
        f"| {label} | {s['params'][key] / 1e6:.2f} M | {s['mrr'][key]:.4f} | "
        f"{s['mrr_ratio'][key]:.3f} | "
        + (f"{s['ms_per_batch'][t]:.0f} | {s['items_per_s'][t]:.1f} |" if t != "-" else "- | - |")
        for label, key, t in rows
    )
    steps = "; ".join(
        f"step {h['step']}: {h['widths']['ffn']} neurons, distillation MSE "
        f"{h.get('loss_first', float('nan')):.4f} -> {h.get('loss_last', float('nan')):.4f}"
        for h in s["history"]
    )
    return f"""## Prune: all-MiniLM-L6-v2, 50% structured FFN pruning + recovery

`{command}`

`prune-structured` on the packaged all-MiniLM-L6-v2: {p["original_widths"]["ffn"]} ->
{p["widths"]["ffn"]} FFN neurons in every layer ({p["criterion"]} importance, cubic schedule
{", ".join(f"{x:.3f}" for x in p["schedule"])}, {a["recovery_steps"]} recovery steps per step
at lr {a["lr"]:g}: MSE of the last hidden state toward the dense model on
{s["train_texts"]} stdlib docstring / code texts from the training modules, batches of
{a["batch_size"]} x up to {a["train_len"]} tokens, no labels).
Saved as a plain HF directory (`intermediate_size={p["widths"]["ffn"]}` in config.json),
reloaded with `AutoModel.from_pretrained` (parity with the in-memory model:
{"ok" if s["parity_ok"] else "FAILED"}). Parameters {p["params_before"] / 1e6:.2f} M ->
{p["params_after"] / 1e6:.2f} M (-{p["param_reduction"]:.1%}, embeddings included).

Speed: batch 32 x 128 tokens, fp32 eager, {a["threads"]} threads, dense and pruned timed in
{a["rounds"]} interleaved rounds (medians). Quality: code-search MRR@10 on {s["pairs"]} held-out
stdlib docstring -> code pairs ({s["held_out_modules"]} held-out top-level modules). Whole run
{s["seconds"]:.0f} s.

| model | params | MRR@10 | ratio to dense | ms / batch of 32 | texts / s |
|---|---:|---:|---:|---:|---:|
{table}

**Speed-up {s["speedup"]:.2f}x** ({speed_ok} the 1.4x goal); **MRR@10 ratio
{s["mrr_ratio"]["recovered"]:.3f}** ({quality_ok} the 0.97 goal).

Recovery per step: {steps}.

Notes: the FFN holds about two thirds of MiniLM's per-token matmul FLOPs (2 x 384 x 1536 vs
4 x 384 x 384 for the attention projections), so halving it cuts about 32% of the layer FLOPs
(~1.46x by FLOPs alone); softmax, layer norms and attention scores are untouched. The machine is
shared (2 cores, other jobs running); timings are medians of interleaved rounds, and earlier runs
under heavier load measured 1.31-1.36x. Quality depends mostly on the importance criterion:
Taylor importance (|w * grad| of the output energy, accumulated over the training batches) keeps
far more than weight norms, and here the short recovery fine-tune adds nothing over the one-shot
cut (earlier runs: 8 Taylor batches gave 0.934 one-shot -> 0.954 recovered; adding a pooled-cosine
term and lr 2e-4 gave 0.909).

{machine_line()}
"""


if __name__ == "__main__":
    sys.exit(main())
