"""Train a code model the handbook's way, on modelkiln.

    python examples/train_code_model.py --quick-demo --output_dir runs/demo-code-model
    python examples/train_code_model.py --model_name microsoft/phi-2 --use_qlora --num_epochs 1

Builds the offline code corpus and tokenizer (cached in
``<output_dir>/pipeline``), then trains with :class:`CodeModelTrainer`:
``--model_name scratch`` (the default) pretrains a small Llama-style code LM
from scratch and fine-tunes it on held-out domain modules; any Hugging Face id
or local directory is fine-tuned directly (it must be available offline or
reachable on your hub). The result is a plain HF model (``train/model``) and a
PEFT adapter (``train/adapter``) that ``transformers`` and ``peft`` load
without modelkiln.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modelkiln.config import load_config
from modelkiln.errors import KilnError
from modelkiln.pipeline import run_pipeline
from modelkiln.train.api import CodeModelTrainer

# Small enough to finish in a couple of minutes on 2 CPU cores.
QUICK_DATA = ["data.max_files=200", "tokenizer.vocab_size=2048"]
QUICK_TRAIN = [
    "model.size=tiny",
    "data.block_size=128",
    "data.domain_modules=[asyncio]",
    "data.max_eval_tokens=4096",
    "pretrain.max_steps=60",
    "pretrain.eval_steps=20",
    "pretrain.save_steps=20",
    "finetune.max_steps=20",
    "finetune.eval_steps=10",
    "finetune.save_steps=10",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The handbook's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick-demo", action="store_true", help="tiny offline run (a few minutes)")
    p.add_argument("--model_name", default="scratch", help="'scratch', a HF id or a local dir")
    p.add_argument("--use_lora", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--use_qlora", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    p.add_argument("--num_epochs", type=float, default=None, help="fine-tune epochs")
    p.add_argument("--output_dir", default="runs/code-model")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="train_set", action="append", default=[], metavar="KEY=VALUE",
                   help="train config override, after --quick-demo's (repeatable): "
                   "--set pretrain.max_steps=4")  # fmt: skip
    p.add_argument(
        "--data_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data/tokenizer stage override (repeatable): --data_set data.max_files=40",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build data + tokenizer, train, print where the model and adapter are."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    try:
        named = {"run": "pipeline", "runs_dir": out, "seed": args.seed}
        named["stages"] = ["data", "tokenizer"]
        data_sets = (QUICK_DATA if args.quick_demo else []) + args.data_set
        cfg = load_config(None, data_sets, named)
        run_pipeline(cfg, report=None)
        trainer = CodeModelTrainer(
            model_name=args.model_name,
            use_lora=args.use_lora,
            r=args.r,
            alpha=args.alpha,
            use_qlora=args.use_qlora,
            num_epochs=args.num_epochs,
            output_dir=out,
            seed=args.seed,
            overrides=(QUICK_TRAIN if args.quick_demo else []) + args.train_set,
        )
        tokenizer = cfg.run_dir / "tokenizer" if args.model_name == "scratch" else None
        artifact = trainer.train(data=cfg.run_dir / "data", tokenizer=tokenizer)
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model:   {artifact.path / 'model'}")
    if (artifact.path / "adapter").is_dir():
        print(f"adapter: {artifact.path / 'adapter'}")
    finetune = artifact.metrics.get("finetune", {})
    if finetune:
        print(
            f"domain perplexity: {finetune.get('perplexity_before', float('nan')):.1f} -> "
            f"{finetune.get('perplexity_after', float('nan')):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
