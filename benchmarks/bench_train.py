"""Training on this CPU: modelkiln's LoRA defaults vs a plain HF Trainer + PEFT script,
full fine-tune vs LoRA, bf16 vs fp32, achieved GFLOP/s vs the ``kiln doctor`` peaks.

Every configuration fine-tunes the quickstart's pretrained code LM (Llama-style,
4 layers x 256 wide, 256-token sequences, batch 8) on the quickstart's held-out
domain modules (asyncio, concurrent, multiprocessing) for the same number of
optimizer steps, each in its own process (so peak RSS is its own), interleaved
over repeats. Throughput is *useful* (non-padding) tokens per second of
optimizer-step time, the median over steps 2..N, recorded by modelkiln's
training monitor in both scripts. Held-out perplexity is measured on the same
packed domain-eval blocks for every model. Needs the quickstart's data and train
artifacts (``kiln quickstart`` or ``kiln train``).

    python benchmarks/bench_train.py --steps 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse when shared

from _record import machine_line, update_section

DOMAIN = ["asyncio", "concurrent", "multiprocessing"]
EVAL_TOKENS = 4096
BLOCK, BATCH = 256, 8
BF16_BATCH = 2  # bf16 matmuls run ~40x slower here: a smaller batch keeps the run short
KINDS = ["kiln-lora", "hf-lora-pad", "kiln-full"]
# Peak learning rates: the finetune default (LoRA), a tenth of it for full tuning (5e-3
# on every weight diverges), and the 2e-4 of typical PEFT example scripts.
LR = {"kiln-lora": 5e-3, "kiln-lora-bf16": 5e-3, "kiln-full": 5e-4, "hf-lora-pad": 2e-4}


def _inputs(run_dir: Path) -> tuple[Any, Any, Any]:
    """(tokenizer, domain text splits, packed eval dataset) of the quickstart run."""
    from transformers import AutoTokenizer

    from modelkiln.train import data as tdata

    tok = AutoTokenizer.from_pretrained(run_dir / "train" / "tokenizer")
    splits = tdata.split_texts(tdata.load_corpus(run_dir / "data"), DOMAIN, 0.2)
    eval_ds = tdata.BlockDataset(tdata.pack_texts(splits.domain_eval, tok, BLOCK, EVAL_TOKENS))
    return tok, splits, eval_ds


def _step_rows(monitor_dir: Path) -> list[dict[str, Any]]:
    from modelkiln.train.monitor import MONITOR_FILE, read_monitor

    return [r for r in read_monitor(monitor_dir / MONITOR_FILE) if r["kind"] == "step"]


def _linear_params(model: Any) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _kiln(
    kind: str, steps: int, tok: Any, splits: Any, eval_ds: Any, model: Any, work: Path
) -> Any:
    """modelkiln's path: packed blocks, its LoRA / full method, run_loop with its defaults."""
    from modelkiln.train import data as tdata
    from modelkiln.train.config import FinetuneConfig, FullMethodConfig, LoraMethodConfig
    from modelkiln.train.engine import run_loop
    from modelkiln.train.monitor import TrainingMonitor
    from modelkiln.train.peft_methods import MethodContext, get_method

    method_cfg = FullMethodConfig() if kind == "kiln-full" else LoraMethodConfig()
    bf16 = kind.endswith("bf16")
    model = get_method(method_cfg.method).apply(
        model, method_cfg, MethodContext(total_steps=steps, bf16=bf16)
    )
    batch = BF16_BATCH if bf16 else BATCH
    blocks = tdata.pack_texts(splits.domain_train, tok, BLOCK, steps * batch * BLOCK)
    loop = FinetuneConfig(
        max_steps=steps, eval_steps=steps, save_steps=steps, learning_rate=LR[kind],
        method=method_cfg, batch_size=batch,
    )  # fmt: skip
    monitor = TrainingMonitor(work / "monitor", block_size=BLOCK)
    run_loop(
        model, tdata.BlockDataset(blocks), eval_ds, loop,
        ckpt_dir=work / "ckpt", precision="bf16" if bf16 else "fp32", seed=0, resume=False,
        callbacks=[monitor], task=kind, block_size=BLOCK,
    )  # fmt: skip
    return model, {"padding_share": 0.0}


def _hf_script(steps: int, tok: Any, splits: Any, model: Any, work: Path) -> Any:
    """A typical HF Trainer + PEFT LoRA script: one example per file, padded to max length."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from modelkiln.train.monitor import MonitoredTrainer, TrainingMonitor

    ds = Dataset.from_dict({"text": splits.domain_train}).map(
        lambda b: tok(b["text"], truncation=True, max_length=BLOCK, padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    masks = ds["attention_mask"]
    real = sum(sum(m) for m in masks)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(work / "out"), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=LR["hf-lora-pad"], logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = MonitoredTrainer(
        model=model, args=args, train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        monitor=TrainingMonitor(work / "monitor"),
    )  # fmt: skip
    trainer.train()
    return model, {"padding_share": 1 - real / (len(masks) * BLOCK), "examples": len(masks)}


def worker(kind: str, steps: int, run_dir: Path) -> dict[str, Any]:
    """Train one configuration; return its figures."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelkiln.train import data as tdata
    from modelkiln.train.engine import evaluate_loss, perplexity
    from modelkiln.train.models import count_parameters

    tok, splits, eval_ds = _inputs(run_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "train" / "model")
    evaluate = not kind.endswith("bf16")  # bf16 forward passes alone take minutes here
    before = evaluate_loss(model, eval_ds, batch_size=BATCH, precision="fp32") if evaluate else 0
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        if kind == "hf-lora-pad":
            model, extra = _hf_script(steps, tok, splits, model, work)
        else:
            # Trainer's own end-of-run eval (outside step time) needs only a token set;
            # perplexity is measured below on all of eval_ds for every configuration.
            loop_eval = tdata.BlockDataset(eval_ds.blocks[:2])
            model, extra = _kiln(kind, steps, tok, splits, loop_eval, model, work)
        rows = _step_rows(work / "monitor")
    after = evaluate_loss(model, eval_ds, batch_size=BATCH, precision="fp32") if evaluate else 0
    trainable, total = count_parameters(model)
    rates = [r["tokens_per_s"] for r in rows[1:] if r["tokens_per_s"]]  # step 1 warms up
    return {
        "kind": kind,
        "steps": len(rows),
        "tokens_per_s": statistics.median(rates),
        "step_s": statistics.median(r["step_time_s"] for r in rows[1:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": trainable,
        "total": total,
        "linear_params": _linear_params(model),
        "ppl_before": perplexity(before) if evaluate else None,
        "ppl_after": perplexity(after) if evaluate else None,
        **extra,
    }


def _spawn(kind: str, steps: int, run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps),
           "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"worker {kind} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def _peak(dtype: str) -> float:
    """``kiln doctor``'s matmul peak in GFLOP/s (fp32 or bf16)."""
    from modelkiln.doctor.measure import measure_matmul

    return measure_matmul(dtype).value or 0.0  # type: ignore[arg-type]


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def render(
    by: dict[str, list[dict[str, Any]]], peaks: dict[str, Any], args: Any, load: list[float]
) -> str:
    """The ``train`` section of docs/BENCHMARKS.md."""
    command = shlex.join(["python", "benchmarks/bench_train.py", *sys.argv[1:]])
    kiln, hf, full = by["kiln-lora"], by["hf-lora-pad"], by["kiln-full"]
    ratio = _med(kiln, "tokens_per_s") / _med(hf, "tokens_per_s")
    mem = _med(kiln, "peak_rss_mb") / _med(hf, "peak_rss_mb")
    pad = hf[0]["padding_share"]
    rows = []
    names = {
        "kiln-lora": "modelkiln LoRA defaults (packed blocks, r16 q/k/v/o)",
        "hf-lora-pad": "plain HF Trainer + PEFT (file per example, pad to 256, r16 q/v)",
        "kiln-full": "modelkiln full fine-tune",
        "kiln-lora-bf16": "modelkiln LoRA, bf16 autocast",
    }
    for kind, runs in by.items():
        rates = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
        ppl = "—" if runs[0]["ppl_after"] is None else (
            f"{runs[0]['ppl_before']:.1f} → {runs[0]['ppl_after']:.1f}"
        )  # fmt: skip
        rows.append(
            f"| {names[kind]} | {_med(runs, 'tokens_per_s'):,.0f} ({rates}) | "
            f"{_med(runs, 'step_s'):.2f} | {_med(runs, 'peak_rss_mb'):,.0f} | "
            f"{runs[0]['trainable']:,} / {runs[0]['total']:,} | "
            f"{runs[0]['padding_share']:.0%} | {ppl} |"
        )
    flops = 6 * full[0]["linear_params"] * _med(full, "tokens_per_s") / 1e9
    bf16 = by.get("kiln-lora-bf16")
    bf16_line = (
        f"bf16 autocast LoRA: {_med(bf16, 'tokens_per_s'):,.0f} tokens/s = "
        f"{_med(bf16, 'tokens_per_s') / _med(kiln, 'tokens_per_s'):.3f}x fp32 "
        f"(batch {BF16_BATCH}, {args.bf16_steps} steps, median of steps 2..N). " if bf16 else ""
    )  # fmt: skip
    return f"""## Training: LoRA vs a plain HF script, full vs LoRA, bf16 vs fp32, GFLOP/s

Command: `{command}`

{machine_line()}
Quickstart model (Llama-style, 4 x 256, {full[0]["total"]:,} parameters) from the
quickstart's pretrain, fine-tuned on the held-out domain modules ({", ".join(DOMAIN)}) for
{args.steps} optimizer steps of {BATCH} x {BLOCK} tokens, fp32 unless said; every row its own
process, {args.repeats} interleaved repeats. Tokens/s = useful (non-padding) tokens per second
of optimizer-step time, median of steps 2..N (per-repeat values in brackets); peak RSS of
the whole process (data, model, training, evaluation). Perplexity: the same {EVAL_TOKENS:,}
held-out domain tokens (packed) before → after.

| configuration | tokens/s | step s | peak RSS MB | trainable / total params | padding | held-out ppl |
|---|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}

- **LoRA throughput vs the plain script: {ratio:.2f}x useful tokens/s** at {mem:.2f}x its
  peak RSS (goal: >= 1.8x at <= 1x; {"met" if ratio >= 1.8 and mem <= 1 else "not met"}).
  Sequence packing is the one data difference: the script pads each file to {BLOCK} tokens,
  so {pad:.0%} of the positions it computes are padding, which bounds packing's gain at
  {1 / (1 - pad):.2f}x here (source files are mostly longer than {BLOCK} tokens; the script
  instead trains on only the first {BLOCK} tokens of each of its {hf[0].get("examples", 0)}
  files). Everything else is the same stack (Trainer, fused AdamW, SDPA attention, fp32);
  modelkiln also adapts the k/o projections. No default was changed: packing is already the
  default and nothing else in the script's path is slower; the goal assumed bf16 on an AMX
  CPU, which does not hold on this AVX2 CPU (next point).
- {bf16_line}`kiln doctor` peaks here: fp32 {peaks["fp32"]:.1f} GFLOP/s, bf16
  {peaks["bf16"]:.1f} GFLOP/s; `precision: auto` therefore picks fp32 on this CPU.
- **Achieved training GFLOP/s** (full fine-tune = pretraining compute, 6 x
  {full[0]["linear_params"]:,} linear-layer parameters x tokens/s; attention scores not
  counted): {flops:.1f} GFLOP/s = {flops / peaks["fp32"]:.0%} of the fp32 matmul peak
  ({flops / max(peaks["bf16"], 1e-9):.1f}x the bf16 peak).
- **Full vs LoRA**: full tuning trains {full[0]["trainable"]:,} parameters vs
  {kiln[0]["trainable"]:,}, peak RSS {_med(full, "peak_rss_mb"):,.0f} vs
  {_med(kiln, "peak_rss_mb"):,.0f} MB (this model is small: weights + AdamW state of 5 M
  parameters are ~80 MB, so the process's fixed cost dominates), and
  {_med(full, "tokens_per_s") / _med(kiln, "tokens_per_s"):.2f}x LoRA's tokens/s.
- **Quality** after {args.steps} steps (the step budget of this benchmark; the quickstart
  runs 60): LoRA lr {LR["kiln-lora"]:g}, full lr {LR["kiln-full"]:g}, the script's lr
  {LR["hf-lora-pad"]:g}; see the perplexity column. Short budgets favour the higher-lr runs.
- Load: the machine is shared; load average {load[0]:.1f} at the start and {load[1]:.1f} at
  the end of this run on 2 cores. The fp32 peak is the best of {len(peaks["fp32_all"])}
  measurements spread over the run ({", ".join(f"{v:.1f}" for v in peaks["fp32_all"])}
  GFLOP/s), yet absolute figures sit below an idle run and ratios within the per-repeat
  spread are noise.
"""


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the figures as JSON, update docs/BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-steps", type=int, default=2, help="0 skips the bf16 run")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="do not edit BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.run_dir)), flush=True)
        return 0
    for need in ("data/corpus", "train/model", "train/tokenizer"):
        if not (args.run_dir / need).exists():
            raise SystemExit(f"{args.run_dir / need} is missing: run `kiln train` first")
    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    # The fp32 peak is re-measured between repeats: under shared load one reading can be low.
    fp32 = [_peak("fp32")]
    by: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            by[kind].append(_spawn(kind, args.steps, args.run_dir))
            print(json.dumps(by[kind][-1]), flush=True)
        fp32.append(_peak("fp32"))
    peaks: dict[str, Any] = {"fp32": max(fp32), "fp32_all": fp32, "bf16": _peak("bf16")}
    if args.bf16_steps:
        by["kiln-lora-bf16"] = [_spawn("kiln-lora-bf16", args.bf16_steps, args.run_dir)]
    load.append(os.getloadavg()[0])
    print(json.dumps({"peaks": peaks, "load": load, "seconds": time.perf_counter() - started}))
    if not args.no_record:
        update_section("train", render(by, peaks, args, load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
