"""Run the pretrain and finetune phases (see :mod:`modelkiln.train.config`).

Checkpoints live outside the artifact (``ckpt_root/<phase>/``) so they
survive a crash: ``steps/checkpoint-N`` (Trainer's), ``final/`` (the phase's
finished model + ``outcome.json``) and ``fingerprint.json`` (a hash of
everything that decides the phase; a different fingerprint discards them).
With ``resume`` a finished phase is reused and an interrupted one continues
from its latest complete checkpoint. The artifact layout is in
:mod:`modelkiln.train.outputs`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.artifacts import hash_json, sha256_file
from modelkiln.hardware import matmul_shape, model_matmul_shape, precision_decision
from modelkiln.progress import QUIET, Progress
from modelkiln.train import data as tdata
from modelkiln.train import distributed as tdist
from modelkiln.train.config import FullMethodConfig, LoopConfig, TrainConfig
from modelkiln.train.engine import (
    COMPLETE,
    LoopResult,
    Resolved,
    barrier,
    evaluate_loss,
    is_main_process,
    perplexity,
    planned_steps,
    run_loop,
)
from modelkiln.train.models import (
    PRESETS,
    build_scratch_model,
    check_sequence_length,
    check_vocabulary,
    count_parameters,
    load_pretrained,
    resolve_source,
    resolve_tokenizer,
)
from modelkiln.train.outputs import save_final, write_outputs
from modelkiln.train.peft_methods import (
    MethodContext,
    TrainingMethod,
    get_method,
    keep_bnb_autograd_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback


@dataclass
class PhaseResult:
    """Numbers of one finished phase (JSON-serialisable)."""

    name: str
    method: str
    steps: int
    train_blocks: int
    eval_blocks: int
    eval_loss_before: float
    eval_loss_after: float
    perplexity_before: float
    perplexity_after: float
    best_eval_loss: float | None
    final_train_loss: float | None
    train_tokens: int
    train_seconds: float
    tokens_per_s: float
    trainable_params: int
    total_params: int
    resumed_from: str | None = None
    reused: bool = False
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)


@dataclass
class FitResult:
    """Everything :func:`fit` produced."""

    phases: list[PhaseResult]
    layout: dict[str, Any]
    precision: str
    seed: int
    precision_reason: str = ""  # why this precision ran (hardware.precision_decision)

    def metrics(self) -> dict[str, Any]:
        """Manifest metrics: per phase numbers (no log history) plus run facts."""
        out: dict[str, Any] = {"precision": self.precision, "seed": self.seed, **self.layout}
        out["precision_reason"] = self.precision_reason
        for p in self.phases:
            out[p.name] = {k: v for k, v in asdict(p).items() if k not in ("log_history", "name")}
        return out


@dataclass
class _Env:
    cfg: TrainConfig
    tokenizer: PreTrainedTokenizerBase
    tok_dir: Path
    ckpt_root: Path
    final_dir: Path | None
    precision: Resolved
    seed: int
    resume: bool
    progress: Progress
    callbacks: Sequence[TrainerCallback]
    precision_reason: str = ""


def _matmul_shape(cfg: TrainConfig) -> tuple[int, int, int] | None:
    """The feed-forward matmul of the model this run trains (None: not known before loading)."""
    if cfg.model.source == "scratch":
        _, width, _, ffn = PRESETS[(cfg.model.architecture, cfg.model.size)]
        return matmul_shape(width, ffn)
    return model_matmul_shape(cfg.model.source)


def fit(
    cfg: TrainConfig,
    *,
    data: str | Path,
    tokenizer: str | Path | None,
    out: Path,
    ckpt_root: Path,
    seed: int,
    final_dir: Path | None = None,
    resume: bool | None = None,
    progress: Progress = QUIET,
    callbacks: Sequence[TrainerCallback] = (),
) -> FitResult:
    """Run the enabled phases and write the artifact files into ``out``.

    Args:
        cfg: the train config.
        data: data artifact directory (or its ``corpus/`` folder).
        tokenizer: tokenizer artifact directory (or the tokenizer folder).
        out: directory to write the artifact files into.
        ckpt_root: checkpoint directory (outside ``out`` so it survives a crash).
        seed: seed of every random choice.
        final_dir: where ``out`` will end up (recorded as the adapter's base path).
        resume: override ``cfg.resume``.
        progress: progress sink.
        callbacks: extra Trainer callbacks for every phase.
    """
    tok, tok_dir = resolve_tokenizer(cfg.model, tokenizer)
    decision = precision_decision(cfg.precision, shape=_matmul_shape(cfg))
    progress.message(f"train: precision {decision.value} ({decision.reason})")
    env = _Env(
        cfg, tok, tok_dir, ckpt_root, final_dir, decision.value, seed,  # type: ignore[arg-type]
        cfg.resume if resume is None else resume, progress, callbacks, decision.reason,
    )  # fmt: skip
    splits = tdata.split_texts(
        tdata.load_corpus(data), cfg.data.domain_modules, cfg.data.domain_eval_fraction
    )
    base: str | None = None if cfg.model.source == "scratch" else cfg.model.source
    lineage = hash_json({"source": cfg.model.source, "tokenizer": _tok_hash(tok_dir)})
    phases: list[PhaseResult] = []
    finals: list[Path] = []
    base_dir: Path | None = None
    if cfg.pretrain.enabled:
        texts = (splits.general_train, splits.general_eval)
        result, final, lineage, base_dir = _run_phase(
            env, "pretrain", cfg.pretrain, FullMethodConfig(), base, texts, lineage
        )
        phases.append(result)
        finals.append(final)
        base = str(final)
    if cfg.finetune.enabled:
        domain = bool(cfg.data.domain_modules)
        texts = (
            splits.domain_train if domain else splits.general_train,
            splits.domain_eval if domain else splits.general_eval,
        )
        result, final, lineage, ft_base = _run_phase(
            env, "finetune", cfg.finetune, cfg.finetune.method, base, texts, lineage
        )
        phases.append(result)
        finals.append(final)
        base_dir = ft_base if get_method(result.method).uses_peft else None
    if not is_main_process():  # under torchrun only rank 0 writes the artifact
        return FitResult(phases, {}, env.precision, seed, env.precision_reason)
    layout = write_outputs(
        out,
        tokenizer=tok,
        final=finals[-1],
        adapter=get_method(phases[-1].method).uses_peft,
        base_dir=base_dir,
        source=cfg.model.source,
        method=phases[-1].method,
        block_size=cfg.data.block_size,
        histories={p.name: p.log_history for p in phases},
    )
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        with contextlib.suppress(OSError):
            ckpt_root.parent.rmdir()  # only when no other stage keeps checkpoints there
    return FitResult(phases, layout, env.precision, seed, env.precision_reason)


def _tok_hash(folder: Path) -> str:
    if not folder.is_dir():  # a hub id: its name identifies it
        return hash_json(str(folder))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".json")
    return hash_json({p.name: sha256_file(p) for p in files})


def _prepare_phase_dir(phase_dir: Path, fingerprint: str, resume: bool) -> None:
    marker = phase_dir / "fingerprint.json"
    stale = marker.is_file() and json.loads(marker.read_text())["fingerprint"] != fingerprint
    if phase_dir.exists() and (stale or not resume):
        shutil.rmtree(phase_dir)
    phase_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")


def _pack_phase(
    env: _Env, name: str, texts: tuple[list[str], list[str]]
) -> tuple[tdata.BlockDataset, tdata.BlockDataset]:
    data, block = env.cfg.data, env.cfg.data.block_size
    train = tdata.pack_texts(texts[0], env.tokenizer, block, data.max_train_tokens)
    held = tdata.pack_texts(texts[1], env.tokenizer, block, data.max_eval_tokens)
    return (
        tdata.blocks_or_error(train, f"{name} training", block),
        tdata.blocks_or_error(held, f"{name} evaluation", block),
    )


def _fingerprint(env: _Env, name: str, loop: LoopConfig, method_cfg: Any, lineage: str,
                 train_ds: tdata.BlockDataset, eval_ds: tdata.BlockDataset) -> str:  # fmt: skip
    """Hash of everything that decides a phase's result: a different one discards checkpoints."""
    cfg = env.cfg
    return hash_json(
        {
            "phase": name,
            "lineage": lineage,
            "loop": loop.model_dump(mode="json"),
            "method": method_cfg.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"),
            "seed": env.seed,
            "precision": env.precision,
            "grad_ckpt": cfg.gradient_checkpointing,
            "blocks": tdata.blocks_digest(train_ds.blocks, eval_ds.blocks),
            # Checkpoints of another process count hold other data positions and RNG states.
            **_distributed_key(env),
        }
    )


def _distributed_key(env: _Env) -> dict[str, Any]:
    world = tdist.world_size()
    if world <= 1:
        return {}
    return {"world_size": world, "distributed": env.cfg.distributed.model_dump(mode="json")}


def _reuse(final: Path) -> PhaseResult:
    outcome = json.loads((final / "outcome.json").read_text(encoding="utf-8"))
    outcome["log_history"] = json.loads((final / "log_history.json").read_text())
    outcome["reused"] = True
    return PhaseResult(**outcome)


def _load_model(
    env: _Env, method: TrainingMethod, method_cfg: Any, mctx: MethodContext,
    base: str | None, base_dir: Path,
) -> tuple[Any, str | None]:  # fmt: skip
    """The phase's starting model (not yet wrapped by the method) and its base source."""
    load_kwargs = method.load_kwargs(method_cfg, mctx)
    if base is None and (method.uses_peft or load_kwargs):
        # An adapter needs its base on disk (QLoRA even loads it from there).
        scratch = build_scratch_model(env.cfg.model, env.tokenizer)
        if is_main_process():
            scratch.save_pretrained(base_dir)
            env.tokenizer.save_pretrained(base_dir)
        barrier()
        base = str(base_dir)
    if base is None:
        return build_scratch_model(env.cfg.model, env.tokenizer), None
    model = load_pretrained(base, **load_kwargs)
    keep_bnb_autograd_path(model)  # before the first eval forward can repack 4-bit layers
    return model, base


def _run_phase(
    env: _Env,
    name: str,
    loop: LoopConfig,
    method_cfg: Any,
    base: str | None,
    texts: tuple[list[str], list[str]],
    lineage: str,
) -> tuple[PhaseResult, Path, str, Path | None]:
    """Train one phase. Returns its result, final folder, fingerprint and local base folder."""
    import torch
    from transformers import set_seed

    cfg, block = env.cfg, env.cfg.data.block_size
    world = tdist.world_size()
    loop = tdist.scale_loop(loop, cfg.distributed, world)  # same global batch on N processes
    extra_args = tdist.trainer_args(cfg.distributed, world, cuda=torch.cuda.is_available())
    train_ds, eval_ds = _pack_phase(env, name, texts)
    fingerprint = _fingerprint(env, name, loop, method_cfg, lineage, train_ds, eval_ds)
    phase_dir = env.ckpt_root / name
    if is_main_process():
        _prepare_phase_dir(phase_dir, fingerprint, env.resume)
    barrier()
    final = phase_dir / "final"
    base_dir = phase_dir / "base" if base is None else Path(resolve_source(base))
    if (final / COMPLETE).is_file():
        env.progress.message(f"{name}: finished earlier, reusing {final}")
        return _reuse(final), final, fingerprint, _produced(env, base_dir)

    set_seed(env.seed)
    method = get_method(method_cfg.method)
    mctx = MethodContext(
        total_steps=planned_steps(len(train_ds), loop, world),
        bf16=env.precision == "bf16",
        tokenizer_dir=str(env.tok_dir),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    model, base = _load_model(env, method, method_cfg, mctx, base, base_dir)
    source = base or cfg.model.source
    check_sequence_length(
        model.config, block + getattr(method_cfg, "num_virtual_tokens", 0), source=source
    )
    check_vocabulary(model, env.tokenizer, source=source)
    before = evaluate_loss(model, eval_ds, batch_size=loop.batch_size, precision=env.precision)
    model = method.apply(model, method_cfg, mctx)
    params = count_parameters(model)
    result = run_loop(
        model, train_ds, eval_ds, loop,
        ckpt_dir=phase_dir / "steps", precision=env.precision, seed=env.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, resume=env.resume,
        callbacks=[*method.callbacks(method_cfg, mctx), *env.callbacks],
        report_to=cfg.report_to, progress=env.progress, task=name, block_size=block,
        extra_args=extra_args,
    )  # fmt: skip
    after = evaluate_loss(model, eval_ds, batch_size=loop.batch_size, precision=env.precision)
    phase = _phase_result(name, method.name, (len(train_ds), len(eval_ds)), (before, after),
                          params, result)  # fmt: skip
    with tdist.full_weights(model):  # FSDP: every rank gathers, rank 0 saves whole weights
        if result.is_main_process:
            adapter_base = _adapter_base_path(env, base_dir, base)
            record = {k: v for k, v in asdict(phase).items() if k != "log_history"}
            save_final(model, final, env.tokenizer, record, phase.log_history,
                       is_peft=method.uses_peft, adapter_base=adapter_base)  # fmt: skip
    barrier()  # the next phase (on every rank) loads this one's model
    return phase, final, fingerprint, _produced(env, base_dir)


def _phase_result(
    name: str,
    method: str,
    blocks: tuple[int, int],
    losses: tuple[float, float],
    params: tuple[int, int],
    result: LoopResult,
) -> PhaseResult:
    train_losses = [h["loss"] for h in result.log_history if "loss" in h]
    return PhaseResult(
        name=name,
        method=method,
        steps=result.global_step,
        train_blocks=blocks[0],
        eval_blocks=blocks[1],
        eval_loss_before=losses[0],
        eval_loss_after=losses[1],
        perplexity_before=perplexity(losses[0]),
        perplexity_after=perplexity(losses[1]),
        best_eval_loss=result.best_eval_loss,
        final_train_loss=train_losses[-1] if train_losses else None,
        train_tokens=result.train_tokens,
        train_seconds=result.train_seconds,
        tokens_per_s=result.tokens_per_s,
        trainable_params=params[0],
        total_params=params[1],
        resumed_from=result.resumed_from,
        log_history=result.log_history,
    )


def _produced(env: _Env, path: Path) -> Path | None:
    """``path`` when this run wrote it (a pretrained or scratch base), else None."""
    inside = env.ckpt_root.resolve() in path.resolve().parents
    return path if inside and path.is_dir() else None


def _adapter_base_path(env: _Env, base_dir: Path, base: str | None) -> str:
    """Where the adapter's base will be: the artifact's model/ when this run made it."""
    if _produced(env, base_dir) is not None and env.final_dir is not None:
        return str((env.final_dir / "model").resolve())
    return str(base_dir if base_dir.is_dir() else base)
