"""The training loop: Hugging Face ``Trainer`` with modelkiln's settings.

Why ``Trainer`` and not a hand-written Accelerate loop: it already does, and
is tested upstream for, everything this stage needs — exact resume (model or
adapter, optimizer, scheduler, RNG states, and the data position: it skips the
batches already seen in the current epoch, with a sampler seeded by
``data_seed + epoch``), gradient accumulation, bf16 autocast on CPU and GPU
and fp16 loss scaling on GPU, gradient clipping, activation checkpointing,
periodic evaluation, best-checkpoint selection, early stopping, PEFT-aware
saving, ``report_to`` integrations, and DDP / FSDP / DeepSpeed when launched
under ``torchrun`` or ``accelerate``. What it lacks we add small:
a one-cycle schedule (torch ``OneCycleLR``), perplexity in the eval logs,
checkpoint-complete markers (a SIGKILL mid-save leaves a checkpoint folder that
must not be resumed from), throughput and progress callbacks.

Example:
    >>> result = run_loop(model, train_ds, eval_ds, PretrainConfig(max_steps=20),
    ...                   ckpt_dir=Path("ckpt"), precision="fp32", seed=0)
    >>> result.global_step
    20
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkiln.progress import QUIET, Progress
from modelkiln.train.config import LoopConfig

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback, TrainingArguments

Resolved = Literal["bf16", "fp16", "fp32"]
COMPLETE = "kiln_complete.json"
_SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant_with_warmup",
    "reduce_on_plateau": "reduce_lr_on_plateau",
    "one_cycle": "constant",  # replaced by OneCycleLR in KilnTrainer.create_scheduler
}


@dataclass
class LoopResult:
    """What one training phase did."""

    global_step: int
    log_history: list[dict[str, Any]]
    train_seconds: float
    train_tokens: int
    best_eval_loss: float | None
    resumed_from: str | None
    is_main_process: bool = True

    @property
    def tokens_per_s(self) -> float:
        """Training throughput of this session (optimizer-step time only)."""
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and always in a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of a distributed run (no-op in a single process)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # joins the torchrun process group (gloo on CPU) as Trainer would
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def planned_steps(n_blocks: int, loop: LoopConfig, world_size: int = 1) -> int:
    """Optimizer steps the phase will run (``max_steps``, or epochs over ``n_blocks``)."""
    if loop.max_steps > 0:
        return loop.max_steps
    per_epoch = math.ceil(n_blocks / (loop.batch_size * world_size))
    return max(1, math.ceil(math.ceil(per_epoch / loop.grad_accum) * loop.epochs))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint folder whose save completed (has the marker)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def remove_incomplete(ckpt_dir: Path) -> None:
    """Delete checkpoint folders a crash left half-written."""
    for p in ckpt_dir.glob("checkpoint-*"):
        if not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)


def training_arguments(
    loop: LoopConfig,
    *,
    ckpt_dir: Path,
    precision: Resolved,
    seed: int,
    gradient_checkpointing: bool = False,
    report_to: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> TrainingArguments:
    """The ``TrainingArguments`` of one phase (``extra``: DDP/FSDP/DeepSpeed arguments)."""
    import torch
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(extra or {})
    if loop.schedule == "reduce_on_plateau":
        kwargs["lr_scheduler_kwargs"] = {"patience": 1, "factor": 0.5}
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=loop.max_steps if loop.max_steps > 0 else -1,
        num_train_epochs=loop.epochs,
        per_device_train_batch_size=loop.batch_size,
        per_device_eval_batch_size=loop.batch_size,
        gradient_accumulation_steps=loop.grad_accum,
        learning_rate=loop.learning_rate,
        lr_scheduler_type=_SCHEDULES[loop.schedule],
        warmup_steps=loop.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=loop.weight_decay,
        max_grad_norm=loop.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps",
        eval_steps=loop.eval_steps,
        save_strategy="steps",
        save_steps=loop.save_steps,
        save_total_limit=loop.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=loop.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to=list(report_to) or "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **kwargs,
    )


def _trainer_class() -> type:
    import torch
    from transformers import Trainer

    class KilnTrainer(Trainer):
        """``Trainer`` plus a one-cycle schedule and eval perplexity in the logs."""

        kiln_schedule = "linear"

        def create_scheduler(
            self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
        ) -> Any:
            if self.kiln_schedule == "one_cycle" and self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                assert opt is not None
                warm = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(  # type: ignore[assignment]
                    opt,
                    max_lr=self.args.learning_rate,
                    total_steps=num_training_steps,
                    pct_start=max(1, warm) / num_training_steps,
                    anneal_strategy="cos",
                )
                self._created_lr_scheduler = True
                return self.lr_scheduler
            return super().create_scheduler(num_training_steps, optimizer)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "eval_loss" in logs:
                logs["eval_perplexity"] = _ppl(logs["eval_loss"])
            super().log(logs, start_time)

    return KilnTrainer


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _callbacks(
    progress: Progress, task: str, total: int, tokens_per_step: int, timing: dict[str, float]
) -> list[TrainerCallback]:
    from transformers import TrainerCallback

    class KilnCallback(TrainerCallback):
        """Checkpoint-complete markers, step timing and progress reporting."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            progress.start(task, total)
            if state.global_step:
                progress.advance(task, state.global_step)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timing["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timing["seconds"] += time.perf_counter() - timing["t0"]
            timing["tokens"] += tokens_per_step
            progress.advance(task)

        def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # The bar shows training progress; only evaluations get a line of their own
            # (every training loss stays in the run's log history and report).
            logs = kw.get("logs") or {}
            shown = {k: logs[k] for k in ("eval_loss", "eval_perplexity") if k in logs}
            if shown:
                text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
                progress.message(f"{task} step {state.global_step}: {text}")

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                marker = {"step": state.global_step}
                (folder / COMPLETE).write_text(json.dumps(marker), encoding="utf-8")

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            progress.finish(task)

    return [KilnCallback()]


def run_loop(
    model: Any,
    train_ds: Any,
    eval_ds: Any,
    loop: LoopConfig,
    *,
    ckpt_dir: Path,
    precision: Resolved,
    seed: int,
    gradient_checkpointing: bool = False,
    resume: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    report_to: Sequence[str] = (),
    progress: Progress = QUIET,
    task: str = "train",
    block_size: int = 0,
    extra_args: dict[str, Any] | None = None,
) -> LoopResult:
    """Train ``model`` for one phase, checkpointing into ``ckpt_dir``.

    With ``resume`` and a complete checkpoint in ``ckpt_dir``, training continues
    from it exactly (same steps, data order and RNG streams). At the end the best
    checkpoint's weights (lowest eval loss) are loaded into ``model``.
    """
    from transformers import EarlyStoppingCallback, PrinterCallback

    args = training_arguments(
        loop,
        ckpt_dir=ckpt_dir,
        precision=precision,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
        report_to=report_to,
        extra=extra_args,
    )
    args.run_name = task  # names the phase for report_to integrations and the monitor
    trainer_cls = _trainer_class()
    timing = {"seconds": 0.0, "tokens": 0.0, "t0": 0.0}
    tokens_per_step = loop.batch_size * loop.grad_accum * block_size * args.world_size
    extra = list(callbacks)
    if loop.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=loop.early_stopping_patience))
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        callbacks=[
            *_callbacks(
                progress,
                task,
                planned_steps(len(train_ds), loop, args.world_size),
                tokens_per_step,
                timing,
            ),
            *extra,
        ],
    )
    trainer.kiln_schedule = loop.schedule
    trainer.remove_callback(PrinterCallback)  # library code does not print; progress reports
    checkpoint = None
    if resume and ckpt_dir.is_dir():
        if trainer.is_world_process_zero():
            remove_incomplete(ckpt_dir)
        found = latest_checkpoint(ckpt_dir)
        checkpoint = str(found) if found else None
    elif ckpt_dir.is_dir() and trainer.is_world_process_zero():
        shutil.rmtree(ckpt_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return LoopResult(
        global_step=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
        train_seconds=timing["seconds"],
        train_tokens=int(timing["tokens"]),
        best_eval_loss=min(evals) if evals else None,
        resumed_from=checkpoint,
        is_main_process=trainer.is_world_process_zero(),
    )


def evaluate_loss(model: Any, dataset: Any, *, batch_size: int, precision: Resolved) -> float:
    """Mean next-token cross-entropy of ``model`` over every block of ``dataset`` (no grad).

    Computed from the logits, not ``model(...).loss``: AdaLoRA adds its orthogonality
    penalty to that loss, and prompt tuning prepends virtual-token positions (dropped here),
    so this is the one number comparable across methods and before/after training.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                ids = dataset.blocks[start : start + batch_size].to(device)
                with torch.autocast(
                    device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ):
                    logits = model(input_ids=ids).logits[:, -ids.shape[1] :]
                # (batch, block - 1, vocab) predicts (batch, block - 1)
                loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    ids[:, 1:].reshape(-1),
                    reduction="sum",
                )
                total += float(loss)
                count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped to stay finite."""
    return _ppl(loss)
