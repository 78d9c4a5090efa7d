"""CTranslate2 side of the completions benchmark (runs in the CTranslate2 venv).

    python ct2_peer.py convert HF_DIR OUT_DIR
    python ct2_peer.py generate CT2_DIR TOKENIZER_DIR PROMPTS_JSON --tokens 128 --threads 2

``generate`` runs one static batch of every prompt (greedy, ``min_length`` = ``max_length``
= ``--tokens``, so EOS cannot end a row early), checks each row got exactly that many
tokens, and prints a JSON line: seconds, tokens, output_tokens_per_s. No HTTP: CTranslate2
has no server of its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def convert(model_dir: str, out: str) -> None:
    """HF directory -> CTranslate2 int8 model directory.

    A byte-level BPE has no unknown token, and the converter then writes
    ``"unk_token": null``, which the runtime refuses ("type must be string, but is
    null"); the EOS token stands in for it (it is never produced as unknown).
    """
    import ctranslate2

    ctranslate2.converters.TransformersConverter(model_dir).convert(
        out, quantization="int8", force=True
    )
    path = Path(out) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("unk_token") is None:
        config["unk_token"] = config["eos_token"]
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def generate(args: argparse.Namespace) -> dict[str, float]:
    """One timed static batch (after a small untimed warm-up batch)."""
    import ctranslate2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
    starts = [tok.convert_ids_to_tokens(tok(p)["input_ids"]) for p in prompts]
    gen = ctranslate2.Generator(args.model, device="cpu", compute_type="int8",
                                intra_threads=args.threads, inter_threads=1)  # fmt: skip
    opts = {"max_length": args.tokens, "min_length": args.tokens, "sampling_topk": 1,
            "include_prompt_in_result": False, "max_batch_size": len(starts)}  # fmt: skip
    gen.generate_batch(starts[:2], **(opts | {"max_length": 4, "min_length": 4}))
    t0 = time.perf_counter()
    out = gen.generate_batch(starts, **opts)
    seconds = time.perf_counter() - t0
    made = [len(r.sequences_ids[0]) for r in out]
    if set(made) != {args.tokens}:
        raise SystemExit(f"CTranslate2 made {sorted(set(made))} tokens per row, not {args.tokens}")
    tokens = sum(made)
    return {"seconds": seconds, "tokens": tokens, "output_tokens_per_s": tokens / seconds,
            "version": ctranslate2.__version__}  # fmt: skip


def main() -> None:
    """Parse the sub-command and run it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("model")
    c.add_argument("out")
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("tokenizer")
    g.add_argument("prompts")
    g.add_argument("--tokens", type=int, default=128)
    g.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cmd == "convert":
        convert(args.model, args.out)
    else:
        print(json.dumps(generate(args)))


if __name__ == "__main__":
    main()
