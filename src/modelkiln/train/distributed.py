"""Multi-process training settings: process facts, batch split and the Trainer's DDP/FSDP/ZeRO args.

Under ``torchrun`` (see :mod:`modelkiln.train.launch`) every process runs the same
:func:`~modelkiln.train.phases.fit`; Hugging Face ``Trainer`` (through accelerate)
reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment, joins the
process group and wraps the model in DDP, FSDP or a DeepSpeed engine. This module
only decides the arguments it gets:

* the batch split: with ``batch: keep_global`` (default) N processes divide the
  configured ``batch_size x grad_accum`` between them, so a run on N processes
  takes the same optimizer steps over the same blocks as the 1-process run
  (accelerate hands process ``r`` every N-th batch of one seeded shuffle);
* the backend: gloo on CPU, nccl on CUDA;
* FSDP (``fsdp`` / ``fsdp_config``, full state dict on save so adapters and models
  are saved whole) or DeepSpeed ZeRO (an inline DeepSpeed config whose batch,
  clipping and precision entries are ``auto``: Trainer fills them from the loop).

Example:
    >>> loop = scale_loop(FinetuneConfig(batch_size=4, grad_accum=2), DistributedConfig(), 2)
    >>> (loop.batch_size, loop.grad_accum)
    (4, 1)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any, TypeVar

from modelkiln.errors import ConfigError, require
from modelkiln.train.config import DistributedConfig, LoopConfig

L = TypeVar("L", bound=LoopConfig)


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE`` set by torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def scale_loop(loop: L, dist: DistributedConfig, world: int) -> L:
    """``loop`` with its per-process batch for ``world`` processes.

    With ``keep_global`` the global batch (``batch_size x grad_accum x world``) stays
    the configured ``batch_size x grad_accum``: gradient accumulation is divided first
    (each process then runs the same micro-batch shape), then the micro-batch.

    Raises:
        ConfigError: ``batch_size x grad_accum`` is not divisible by ``world``.
    """
    if world <= 1 or dist.batch == "per_device":
        return loop
    shared = math.gcd(loop.grad_accum, world)
    rest = world // shared
    if loop.batch_size % rest:
        raise ConfigError(
            f"cannot split a global batch of {loop.batch_size} x {loop.grad_accum} blocks "
            f"(batch_size x grad_accum) over {world} processes",
            hint=f"make batch_size x grad_accum a multiple of {world}, or set "
            "train.distributed.batch=per_device",
        )
    return loop.model_copy(
        update={"grad_accum": loop.grad_accum // shared, "batch_size": loop.batch_size // rest}
    )


def check_strategy(dist: DistributedConfig, *, cuda: bool) -> None:
    """Fail early when the strategy cannot run here.

    Raises:
        DependencyMissingError: DeepSpeed is selected but not installed.
        ConfigError: FSDP, or the nccl backend, without CUDA GPUs.
    """
    if dist.strategy == "deepspeed":
        require("deepspeed", "distributed", purpose="DeepSpeed ZeRO training")
    if dist.strategy == "fsdp" and not cuda:
        # accelerate (1.15) turns FSDP on only for multi-GPU runs; on CPU processes
        # Trainer would silently train plain DDP instead.
        raise ConfigError(
            "train.distributed.strategy=fsdp needs CUDA GPUs (Trainer/accelerate shard "
            "only multi-GPU runs; on CPU it would silently train DDP)",
            hint="use train.distributed.strategy=ddp on CPU",
        )
    backend(dist, cuda=cuda)


def backend(dist: DistributedConfig, *, cuda: bool) -> str:
    """The process-group backend: the configured one, or nccl on CUDA and gloo on CPU."""
    if dist.backend != "auto":
        if dist.backend == "nccl" and not cuda:
            raise ConfigError(
                "the nccl backend needs CUDA GPUs", hint="set train.distributed.backend=gloo"
            )
        return dist.backend
    return "nccl" if cuda else "gloo"


def deepspeed_config(dist: DistributedConfig) -> dict[str, Any]:
    """The DeepSpeed config dict of ``dist.deepspeed`` (``auto`` entries filled by Trainer)."""
    ds = dist.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
    }
    if ds.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
    for key, where in (("offload_optimizer", ds.offload_optimizer),
                       ("offload_param", ds.offload_params)):  # fmt: skip
        if where != "none":
            zero[key] = {"device": where, "pin_memory": True}
            if where == "nvme":
                zero[key]["nvme_path"] = ds.nvme_path
    if ds.stage == 3:
        # Saved models and adapters are whole: gather the shards into rank 0 on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def trainer_args(dist: DistributedConfig, world: int, *, cuda: bool) -> dict[str, Any]:
    """Extra ``TrainingArguments`` for a run of ``world`` processes (none for one process).

    Raises:
        DependencyMissingError: DeepSpeed is selected but not installed.
        ConfigError: nccl without CUDA.
    """
    if world <= 1:
        return {}
    check_strategy(dist, cuda=cuda)
    args: dict[str, Any] = {"ddp_backend": backend(dist, cuda=cuda)}
    if dist.strategy == "fsdp":
        fsdp = dist.fsdp
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": fsdp.sharding == "full_shard",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if fsdp.auto_wrap else "NO_WRAP",
            "cpu_offload": fsdp.cpu_offload,
            "state_dict_type": "FULL_STATE_DICT",  # whole weights on save, not shards
        }
    elif dist.strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config(dist)
    else:
        args["ddp_find_unused_parameters"] = False
    return args


@contextlib.contextmanager
def full_weights(model: Any) -> Iterator[None]:
    """Inside, ``model.save_pretrained`` on rank 0 saves whole weights of an FSDP-sharded model.

    Every rank must enter (the gather is a collective): the full state dict is gathered
    to rank 0's CPU memory (other ranks hold none). A model that is not sharded (one
    process, DDP; DeepSpeed ZeRO-3 gathers on save itself) is left as is.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded
        yield
        return
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # transformers' and peft's save_pretrained read model.state_dict(), which for FSDP2
    # returns the local shards; shadow it on this instance with the gathered weights.
    model.state_dict = lambda *args, **kwargs: full
    try:
        yield
    finally:
        del model.state_dict
