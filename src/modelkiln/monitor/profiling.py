"""Compute a reference profile of a model on held-out data (``kiln monitor profile``).

Held-out data is the data stage's ``test`` split (read through
:mod:`modelkiln.contract.corpus`), a folder of text files, or a JSONL file with
a ``text`` / ``prompt`` field. Texts are shuffled with a fixed seed and capped
at ``max_samples``; each is cut to ``max_prompt_tokens`` tokens, the same cut
a replay of held-out traffic uses, so the profile describes what the server
will see. torch / transformers are imported inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import ConfigError
from modelkiln.monitor.features import common_ids_leave_one_out, token_stats
from modelkiln.monitor.profile import PROFILE_DIR, FeatureData, model_hash, write_profile

_TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")


def load_heldout_texts(data: str | Path) -> list[str]:
    """The held-out texts at ``data`` (data-stage artifact, text folder or JSONL).

    Raises:
        ConfigError: ``data`` does not exist or holds no texts.
    """
    path = Path(data)
    if path.is_file() and path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        texts = [str(r.get("text", r.get("prompt", ""))) for r in rows]
    elif path.is_dir() and _is_data_artifact(path):
        from modelkiln.contract.corpus import load_corpus

        texts = list(load_corpus(path, required=("test",))["test"]["text"])
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
        texts = [p.read_text(errors="replace") for p in files]
    else:
        raise ConfigError(f"held-out data '{data}' does not exist", hint=_DATA_HINT)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"held-out data '{data}' holds no texts", hint=_DATA_HINT)
    return texts


_DATA_HINT = (
    "pass the data stage's folder (its test split is used), a folder of .txt/.py/.md "
    "files, or a .jsonl file with a 'text' field"
)


def _is_data_artifact(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "corpus").is_dir()


def compute_profile(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    out: str | Path | None = None,
    model_name: str | None = None,
    max_samples: int = 500,
    max_prompt_tokens: int = 256,
    gen_tokens: int = 16,
    source: str = "",
    seed: int = 0,
) -> Path:
    """Profile the model at ``model_dir`` on ``texts`` and write ``<model_dir>/monitor_profile``.

    Request features always; causal LMs add output length, mean log-prob and
    entropy of ``gen_tokens`` greedy tokens; encoders add a sample of mean-pooled
    embeddings (and max-softmax confidence for sequence classifiers).
    """
    from modelkiln.contract.hfmodel import inspect_model, load_tokenizer, load_torch_model

    model_dir = Path(model_dir)
    spec = inspect_model(model_dir)
    tok = load_tokenizer(model_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))[:max_samples]
    ids = [
        np.asarray(tok(texts[i], add_special_tokens=False)["input_ids"][:max_prompt_tokens])
        for i in order
    ]
    prompts: list[str] = [str(tok.decode(a.tolist())) for a in ids]
    common, rare = common_ids_leave_one_out(ids, len(tok))
    feats = _request_features(tok, ids, prompts, rare)
    model = load_torch_model(spec)
    if spec.task == "causal-lm":
        feats.update(_causal_features(model, tok, ids, gen_tokens))
    else:
        feats.update(_encoder_features(model, tok, prompts, spec.architecture))
    return write_profile(
        out or model_dir / PROFILE_DIR, feats, model_name=model_name or model_dir.name,
        model_hash=model_hash(model_dir), source=source,
        extras={"common_token_ids": common, "tokenizer_info": _tokenizer_info(tok)},
    )  # fmt: skip


def _tokenizer_info(tok: Any) -> np.ndarray:
    """``[vocab size, unknown token id or -1]``, what a server needs to featurize requests."""
    unk = tok.unk_token_id
    return np.array([len(tok), -1 if unk is None else int(unk)], dtype=np.int64)


def _request_features(
    tok: Any, ids: list[np.ndarray], prompts: list[str], rare: np.ndarray
) -> dict[str, FeatureData]:
    unk = tok.unk_token_id
    unk_share = [float(np.mean(a == unk)) if len(a) and unk is not None else 0.0 for a in ids]
    return {
        "input_tokens": FeatureData("num", "request", np.array([len(a) for a in ids], float)),
        "byte_length": FeatureData(
            "num", "request", np.array([len(p.encode()) for p in prompts], float)
        ),
        "unknown_token_share": FeatureData("num", "request", np.array(unk_share)),
        "rare_token_share": FeatureData("num", "request", rare),
    }


def _causal_features(
    model: Any, tok: Any, ids: list[np.ndarray], gen_tokens: int
) -> dict[str, FeatureData]:
    import torch

    lengths, logprobs, entropies, finishes = [], [], [], []
    eos = tok.eos_token_id
    with torch.inference_mode():
        for a in ids:  # one at a time: no padding semantics to get wrong, tiny cost here
            prompt = a if len(a) else np.array([eos if eos is not None else 0])
            out = model.generate(
                torch.as_tensor(prompt[None, :]), max_new_tokens=gen_tokens, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=eos,
            )  # fmt: skip
            chosen = out.sequences[0, len(prompt) :].numpy()
            logits = torch.stack(out.scores, dim=1)[0].float().numpy()
            lp, ent = token_stats(logits, chosen)
            lengths.append(float(len(chosen)))
            logprobs.append(lp)
            entropies.append(ent)
            # the server's finish reason: EOS ends with "stop", the token limit with "length"
            finishes.append("stop" if eos is not None and eos in chosen else "length")
    return {
        "finish_reason": FeatureData("cat", "output", np.array(finishes)),
        "output_tokens": FeatureData("num", "output", np.array(lengths)),
        "mean_logprob": FeatureData("num", "output", np.array(logprobs)),
        "mean_entropy": FeatureData("num", "output", np.array(entropies)),
    }


def _encoder_features(
    model: Any, tok: Any, prompts: list[str], architecture: str
) -> dict[str, FeatureData]:
    import torch

    embs, conf = [], []
    with torch.inference_mode():
        for start in range(0, len(prompts), 32):
            batch = tok(prompts[start : start + 32], padding=True, truncation=True,
                        return_tensors="pt")  # fmt: skip
            out = model(**batch)
            if architecture.endswith("ForSequenceClassification"):
                conf.extend(torch.softmax(out.logits, -1).max(-1).values.tolist())
                continue
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
            embs.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    if conf:
        return {"confidence": FeatureData("num", "output", np.array(conf))}
    return {"embedding": FeatureData("emb", "output", np.concatenate(embs).astype(np.float32))}


def table_features(columns: dict[str, Any]) -> dict[str, FeatureData]:
    """Tabular inputs: one feature per column, ``num`` when numeric, else ``cat``."""
    feats = {}
    for name, col in columns.items():
        arr = np.asarray(col)
        if np.issubdtype(arr.dtype, np.number):
            feats[name] = FeatureData("num", "table", arr.astype(float))
        else:
            feats[name] = FeatureData("cat", "table", arr.astype(str))
    return feats
