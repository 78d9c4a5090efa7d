"""Validated configuration of the ``train`` stage.

A training run has up to two phases over one base model:

1. ``pretrain``: full training on the general corpus (the corpus train split
   minus the domain modules) — from scratch for the ``scratch`` source, or
   continued pretraining for a Hugging Face model.
2. ``finetune``: the chosen method (full, LoRA, QLoRA, AdaLoRA, prompt tuning,
   IA3) on the *domain* modules, which pretraining never saw.

Example (YAML, section ``train:`` of a pipeline config)::

    train:
      model: {source: scratch, architecture: llama, size: small}
      pretrain: {max_steps: 200}
      finetune: {max_steps: 60, learning_rate: 5.0e-3, method: {method: lora, r: 16, alpha: 32}}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from modelkiln.configbase import FieldError, KilnModel

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Schedule = Literal["linear", "cosine", "one_cycle", "reduce_on_plateau", "constant"]


class ModelConfig(KilnModel):
    """Where the base model comes from."""

    source: str = Field(
        "scratch",
        min_length=1,
        description="'scratch' (a fresh model from a preset, sized to the tokenizer) or a "
        "Hugging Face model id / local directory (loaded offline from the local cache).",
    )
    architecture: Literal["gpt2", "llama"] = Field(
        "llama", description="Architecture of a 'scratch' model (ignored for other sources)."
    )
    size: Literal["tiny", "small"] = Field(
        "small",
        description="Preset of a 'scratch' model: 'tiny' (2 layers, 64 wide; tests) or "
        "'small' (4 layers, 256 wide; the quickstart).",
    )
    max_positions: int | None = Field(
        None, ge=8, description="Position limit of a 'scratch' model; None = the preset's (512)."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout of a 'scratch' model (attention, residual)."
    )
    tokenizer: Literal["auto", "artifact", "model"] = Field(
        "auto",
        description="Which tokenizer to use: the tokenizer artifact, the model's own, or 'auto' "
        "(the model's own when the source has one, else the artifact).",
    )


class FullMethodConfig(KilnModel):
    """Full fine-tune: every parameter trains."""

    method: Literal["full"] = Field("full", description="Method name.")


class LoraMethodConfig(KilnModel):
    """LoRA: low-rank adapters on the attention (and projection) layers."""

    method: Literal["lora"] = Field("lora", description="Method name.")
    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt (suffix match, e.g. ['q_proj', 'v_proj']); None "
        "detects them per architecture (GPT-2: c_attn, c_proj; Llama: q/k/v/o_proj).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train beside the adapters."
    )


class QLoraMethodConfig(LoraMethodConfig):
    """QLoRA: LoRA over a frozen 4-bit (bitsandbytes) base model."""

    method: Literal["qlora"] = Field("qlora", description="Method name.")  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base (NF4 is QLoRA's)."
    )
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")


class AdaLoraMethodConfig(KilnModel):
    """AdaLoRA: LoRA whose per-layer ranks are re-allocated during training."""

    method: Literal["adalora"] = Field("adalora", description="Method name.")
    init_r: int = Field(12, ge=1, description="Initial rank of every adapted layer.")
    target_r: int = Field(8, ge=1, description="Average rank left after allocation.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (alpha/r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    tinit: int = Field(0, ge=0, description="Steps before rank allocation starts.")
    tfinal: int = Field(0, ge=0, description="Final steps with the ranks frozen.")
    delta_t: int = Field(1, ge=1, description="Steps between two rank allocations.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None detects them per architecture."
    )

    @model_validator(mode="after")
    def _ranks(self) -> AdaLoraMethodConfig:
        if self.target_r > self.init_r:
            raise FieldError(
                "target_r",
                f"target_r ({self.target_r}) must be <= init_r ({self.init_r})",
                hint="lower target_r or raise init_r",
            )
        return self


class PromptTuningMethodConfig(KilnModel):
    """Prompt tuning: trainable virtual-token embeddings prepended to every input.

    Needs a far higher learning rate than LoRA (3e-2 to 3e-1): only a few embedding
    vectors train.
    """

    method: Literal["prompt_tuning"] = Field("prompt_tuning", description="Method name.")
    num_virtual_tokens: int = Field(16, ge=1, description="Number of virtual tokens.")
    init_text: str | None = Field(
        None,
        description="Initialise the virtual tokens from this text's embeddings; None = random.",
    )


class IA3MethodConfig(KilnModel):
    """IA3: learned rescaling vectors on keys, values and the feed-forward layer."""

    method: Literal["ia3"] = Field("ia3", description="Method name.")
    target_modules: list[str] | None = Field(
        None, description="Module names to rescale; None detects them per architecture."
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Which of target_modules are feed-forward (scaled at the input); None detects.",
    )


MethodConfig = Annotated[
    FullMethodConfig
    | LoraMethodConfig
    | QLoraMethodConfig
    | AdaLoraMethodConfig
    | PromptTuningMethodConfig
    | IA3MethodConfig,
    Field(discriminator="method"),
]


class LoopConfig(KilnModel):
    """Optimisation, evaluation and checkpointing of one training phase."""

    max_steps: int = Field(
        200, ge=0, description="Optimizer steps; 0 = run 'epochs' epochs over the data instead."
    )
    epochs: float = Field(1.0, gt=0, description="Epochs over the data when max_steps is 0.")
    batch_size: int = Field(8, ge=1, description="Blocks per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    schedule: Schedule = Field(
        "cosine",
        description="Learning-rate schedule: linear or cosine decay (both after warmup), "
        "one_cycle (torch OneCycleLR), reduce_on_plateau (on eval loss), constant.",
    )
    warmup_ratio: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of the steps spent warming up (one_cycle: rising)."
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip gradients to this norm; 0 = off.")
    eval_steps: int = Field(50, ge=1, description="Evaluate (loss, perplexity) every N steps.")
    save_steps: int = Field(
        50, ge=1, description="Checkpoint every N steps (a multiple of eval_steps)."
    )
    save_total_limit: int = Field(
        2, ge=1, description="Checkpoints kept (the best one is always kept too)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without a better eval loss; None = off."
    )
    logging_steps: int = Field(5, ge=1, description="Record the train loss every N steps.")

    @model_validator(mode="after")
    def _save_on_eval(self) -> LoopConfig:
        if self.save_steps % self.eval_steps:
            raise FieldError(
                "save_steps",
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps "
                f"({self.eval_steps}) so the best checkpoint can be kept",
                hint=f"set save_steps to a multiple of {self.eval_steps}",
            )
        return self


class PretrainConfig(LoopConfig):
    """Phase 1: full training of the base on the general corpus."""

    enabled: bool = Field(True, description="Run this phase.")


class FinetuneConfig(LoopConfig):
    """Phase 2: the chosen method on the domain modules."""

    enabled: bool = Field(True, description="Run this phase.")
    method: MethodConfig = Field(
        default_factory=LoraMethodConfig, description="Training method (discriminated on 'method')."
    )
    max_steps: int = Field(
        60, ge=0, description="Optimizer steps; 0 = run 'epochs' epochs over the data instead."
    )
    learning_rate: float = Field(5e-3, gt=0, description="Peak learning rate.")
    eval_steps: int = Field(20, ge=1, description="Evaluate (loss, perplexity) every N steps.")
    save_steps: int = Field(
        20, ge=1, description="Checkpoint every N steps (a multiple of eval_steps)."
    )


class TrainDataConfig(KilnModel):
    """Which corpus text each phase trains and evaluates on, and how it is packed."""

    block_size: int = Field(256, ge=8, description="Tokens per packed training sequence.")
    domain_modules: list[str] = Field(
        default_factory=lambda: ["asyncio", "concurrent", "multiprocessing"],
        description="Top-level modules held out of pretraining and used by the finetune phase "
        "(taken from the train and validation splits, never test); [] = finetune on the corpus.",
    )
    domain_eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Share of the domain's files held out for evaluation."
    )
    max_train_tokens: int | None = Field(
        None, ge=1, description="Train on at most this many tokens per phase; None = all."
    )
    max_eval_tokens: int | None = Field(
        16_384, ge=1, description="Evaluate on at most this many tokens; None = all."
    )


Offload = Literal["none", "cpu", "nvme"]


class FsdpConfig(KilnModel):
    """FSDP2 (``distributed.strategy: fsdp``): torch ``fully_shard`` through Trainer/accelerate."""

    sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard",
        description="full_shard: parameters are re-sharded after forward (ZeRO-3-like, least "
        "memory); shard_grad_op: they stay gathered until backward (ZeRO-2-like, faster).",
    )
    auto_wrap: bool = Field(
        True, description="Shard per transformer block (the model's no-split modules)."
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters in CPU memory.")


class DeepSpeedConfig(KilnModel):
    """DeepSpeed ZeRO (``distributed.strategy: deepspeed``; needs the ``distributed`` extra).

    Batch size, accumulation, clipping and precision come from the phase's loop settings
    (passed to DeepSpeed as ``auto``), so one config serves both phases.
    """

    stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: Offload = Field(
        "none", description="Where the optimizer state lives: GPU (none), CPU or NVMe."
    )
    offload_params: Offload = Field(
        "none", description="Where the parameters live between uses (stage 3 only)."
    )
    nvme_path: str | None = Field(None, description="Folder for NVMe offload.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    contiguous_gradients: bool = Field(True, description="Copy gradients to one buffer.")
    reduce_bucket_size: int | None = Field(
        None, ge=1, description="Elements per all-reduce bucket; None = DeepSpeed's choice."
    )

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_params != "none" and self.stage != 3:
            raise FieldError(
                "offload_params",
                f"offload_params needs ZeRO stage 3 (stage is {self.stage})",
                hint="set stage: 3 or offload_params: none",
            )
        if "nvme" in (self.offload_params, self.offload_optimizer) and not self.nvme_path:
            raise FieldError(
                "nvme_path",
                "NVMe offload needs nvme_path",
                hint="set nvme_path to a fast local dir",
            )
        return self


class DistributedConfig(KilnModel):
    """How a multi-process run (``kiln train --nproc N``, torchrun) trains.

    Ignored in a single process. Example::

        train:
          distributed: {strategy: deepspeed, deepspeed: {stage: 3, offload_optimizer: cpu}}
    """

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp (a full replica per process), fsdp (sharded, torch) or deepspeed (ZeRO).",
    )
    batch: Literal["keep_global", "per_device"] = Field(
        "keep_global",
        description="keep_global: N processes split the configured batch (grad_accum, else "
        "batch_size, divided by N) so results match the 1-process run; per_device: every "
        "process takes batch_size x grad_accum blocks (global batch x N).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend; auto = nccl on CUDA, gloo on CPU."
    )
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="FSDP settings.")
    deepspeed: DeepSpeedConfig = Field(
        default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO settings."
    )


class MonitorConfig(KilnModel):
    """The training monitor (``train.monitor``): see :mod:`modelkiln.train.monitor`."""

    enabled: bool = Field(
        True, description="Record monitor.jsonl, plots and a report section for every phase."
    )
    sample_interval_s: float = Field(
        1.0, gt=0.0, le=60.0, description="Seconds between two CPU / RAM / GPU samples."
    )
    plots: bool = Field(True, description="Draw monitor_<phase>.png at the end of each phase.")
    gpu: bool = Field(True, description="Sample GPU memory (and utilization) when CUDA is present.")


class TrainConfig(KilnModel):
    """The ``train`` stage: base model, data, the two phases, precision, checkpoints."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model source.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Training data.")
    pretrain: PretrainConfig = Field(
        default_factory=PretrainConfig, description="Phase 1: full training on the general corpus."
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig, description="Phase 2: the method on the domain modules."
    )
    precision: Precision = Field(
        "auto",
        description="Compute precision: bf16 autocast, fp16 (CUDA, loss scaling), fp32, or "
        "'auto' (bf16 where the hardware has fast bf16 — CUDA or a CPU with AMX/AVX512-BF16 — "
        "else fp32; bf16 on a CPU without them is many times slower).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    seed: int | None = Field(None, description="Seed of this stage; None = the pipeline's seed.")
    resume: bool = Field(
        True,
        description="Continue from the latest complete checkpoint of an interrupted run with "
        "the same config (a finished phase is not re-run).",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep the checkpoint directory after the stage succeeds."
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Trainer integrations to log to when installed (tensorboard, mlflow, wandb).",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Multi-process training (DDP / FSDP / DeepSpeed) under torchrun.",
    )
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig,
        description="Training monitor: per-step numbers, CPU/RAM/GPU samples, plots, report.",
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> TrainConfig:
        if not (self.pretrain.enabled or self.finetune.enabled):
            raise FieldError(
                "finetune.enabled",
                "pretrain and finetune are both disabled",
                hint="enable at least one: --set train.finetune.enabled=true",
            )
        return self
