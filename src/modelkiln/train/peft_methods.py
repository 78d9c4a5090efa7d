"""Training methods by name: full fine-tune and PEFT adapters, all through ``peft``.

Each method is a small class registered in :data:`METHODS`; it may add
``from_pretrained`` arguments (QLoRA's 4-bit quantization), wraps the model
(``peft.get_peft_model``) and may add Trainer callbacks (AdaLoRA's rank
allocation). Adding a method = one class here + its config in
``train/config.py`` + a row in the shared test matrix.

Target modules are detected per architecture when not given: GPT-2's fused
``Conv1D`` ``c_attn`` / ``c_proj`` (LoRA sets ``fan_in_fan_out`` for them),
Llama's ``q/k/v/o_proj``, then peft's own table, then every linear layer but
the output head. A named module that the model lacks is a :class:`ConfigError`
listing the names it has.

QLoRA loads the frozen base in 4 bits with bitsandbytes (NF4 by default, with
double quantization). bitsandbytes >= 0.45 ships a CPU backend, so QLoRA runs
on CPU too (slowly: the 4-bit matmuls dequantize on the fly); on CUDA it is the
usual fast path. GPT-2's ``Conv1D`` layers become ``Linear4bit`` on loading.

AdaLoRA's rank allocation (``update_and_allocate``) runs in
:class:`AdaLoraAllocationCallback` after every optimizer step — after, not
before, or the saved adapter would not match the trained model. The callback
also makes AdaLoRA checkpoints resumable exactly: each checkpoint gets the rank
allocator's state (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``) and the current
rank pattern in ``kiln_adalora.pt``, restored when training resumes. During
training the pattern is kept out of the peft config, so checkpoints hold the
full-rank (masked) adapter that resumes into the same module shapes and
optimizer state; it is put back at the end, so the final adapter is saved
pruned to its allocated ranks, as peft does.

Example:
    >>> method = get_method("lora")
    >>> peft_model = method.apply(model, LoraMethodConfig(r=8), MethodContext(total_steps=100))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ConfigError, require
from modelkiln.train.config import (
    AdaLoraMethodConfig,
    IA3MethodConfig,
    LoraMethodConfig,
    PromptTuningMethodConfig,
    QLoraMethodConfig,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainerCallback

#: model_type -> LoRA / AdaLoRA targets (suffix match on module names).
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value"],
}
#: model_type -> (IA3 targets, which of them are feed-forward).
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}
_ADAPTABLE = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "Conv2d", "Embedding")
_NEVER = ("lm_head", "embed_out", "score", "classifier")


@dataclass
class MethodContext:
    """What a method may need beyond its config.

    Attributes:
        total_steps: planned optimizer steps (AdaLoRA's schedule needs it).
        bf16: compute in bf16 (QLoRA's compute dtype).
        tokenizer_dir: a ``from_pretrained`` tokenizer folder (prompt-tuning text init).
        task_type: peft task type, ``CAUSAL_LM`` or ``FEATURE_EXTRACTION``.
        gradient_checkpointing: the run recomputes activations (QLoRA's k-bit prep).
    """

    total_steps: int = 0
    bf16: bool = False
    tokenizer_dir: str | None = None
    task_type: str = "CAUSAL_LM"
    gradient_checkpointing: bool = False


class TrainingMethod(ABC):
    """A training method: extra load arguments, model wrapping and callbacks."""

    name: ClassVar[str] = ""
    uses_peft: ClassVar[bool] = True

    def load_kwargs(self, cfg: Any, ctx: MethodContext) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments for the base model."""
        return {}

    @abstractmethod
    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        """Return the model to train (the base itself, or a ``PeftModel`` around it)."""

    def callbacks(self, cfg: Any, ctx: MethodContext) -> list[TrainerCallback]:
        """Trainer callbacks the method needs."""
        return []


METHODS: dict[str, type[TrainingMethod]] = {}


def register(name: str) -> Callable[[type[TrainingMethod]], type[TrainingMethod]]:
    """Class decorator: register a :class:`TrainingMethod` under ``name``."""

    def deco(cls: type[TrainingMethod]) -> type[TrainingMethod]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> TrainingMethod:
    """The registered method ``name``.

    Raises:
        ConfigError: no method has that name.
    """
    if name not in METHODS:
        raise ConfigError(
            f"unknown training method {name!r}", hint=f"use one of {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]()


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", ""))


def adaptable_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> class name of every layer an adapter can wrap (output head excluded)."""
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if type(module).__name__ in _ADAPTABLE and name.rsplit(".", 1)[-1] not in _NEVER
    }


def resolve_targets(
    model: nn.Module, requested: list[str] | None, defaults: list[str]
) -> list[str]:
    """Check ``requested`` (or ``defaults``) against the model's layers.

    Returns the target names. Falls back to every adaptable leaf name when
    there are no defaults for this architecture.

    Raises:
        ConfigError: a requested name matches no adaptable layer of the model.
    """
    layers = adaptable_modules(model)
    targets = requested if requested is not None else defaults
    if not targets:
        targets = sorted(
            {n.rsplit(".", 1)[-1] for n, kind in layers.items() if kind != "Embedding"}
        )
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise ConfigError(
            f"target module {missing[0]!r} is not a layer of this {_model_type(model) or 'model'} "
            f"(adaptable layers: {', '.join(leaves[:12])})",
            hint="fix target_modules or leave it empty to detect them per architecture",
        )
    return list(targets)


def _fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2's ``Conv1D`` stores weights transposed; peft must be told."""
    layers = adaptable_modules(model)
    return any(
        kind == "Conv1D" and any(n == t or n.endswith("." + t) for t in targets)
        for n, kind in layers.items()
    )


def _lora_defaults(model: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    kind = _model_type(model)
    return list(LORA_TARGETS.get(kind) or PEFT.get(kind) or [])


@register("full")
class FullMethod(TrainingMethod):
    """Full fine-tune: the base model itself, every parameter trainable."""

    uses_peft = False

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@register("lora")
class LoraMethod(TrainingMethod):
    """LoRA adapters (``peft.LoraConfig``)."""

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        assert isinstance(cfg, LoraMethodConfig)
        targets = resolve_targets(model, cfg.target_modules, _lora_defaults(model))
        config = LoraConfig(
            task_type=ctx.task_type,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            bias=cfg.bias,
            fan_in_fan_out=_fan_in_fan_out(model, targets),
        )
        return get_peft_model(model, config)


@register("qlora")
class QLoraMethod(LoraMethod):
    """LoRA over a frozen 4-bit bitsandbytes base (NF4 + double quantization)."""

    def load_kwargs(self, cfg: Any, ctx: MethodContext) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        assert isinstance(cfg, QLoraMethodConfig)
        require("bitsandbytes", "train", purpose="QLoRA's 4-bit base model")
        compute = torch.bfloat16 if ctx.bf16 else torch.float32
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        return {"quantization_config": quant}

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        if not getattr(model, "is_loaded_in_4bit", False):
            raise ConfigError(
                "qlora needs a base model loaded in 4 bits",
                hint="load the base through the method's load_kwargs (train() does this)",
            )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=ctx.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_bnb_autograd_path(model)
        return super().apply(model, cfg, ctx)


def keep_bnb_autograd_path(model: nn.Module) -> None:
    """Keep every 4-bit layer on bitsandbytes' dequantize + matmul path while training.

    On AVX512-BF16 CPUs bitsandbytes (>= 0.48) repacks a Linear4bit the first time it runs
    in eval mode without grad (the Trainer's eval steps): the repack rounds the block
    scales to bf16 for good and later forwards use a bf16 kernel that has no backward, so
    the rest of training got wrong gradients and the trained model drifted from the saved
    base (reload parity 1e-3 on class B, exact on AVX2). Call it right after loading, before
    any eval forward. Inference after a plain transformers reload may still use that kernel
    (bitsandbytes' choice).
    """
    layer: Any  # bitsandbytes.nn.Linear4bit (an optional dependency: no import for its type)
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False


@register("adalora")
class AdaLoraMethod(TrainingMethod):
    """AdaLoRA adapters whose ranks are re-allocated after every optimizer step."""

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        from peft import AdaLoraConfig, get_peft_model

        assert isinstance(cfg, AdaLoraMethodConfig)
        if ctx.total_steps <= cfg.tinit + cfg.tfinal:
            raise ConfigError(
                f"adalora: tinit + tfinal = {cfg.tinit + cfg.tfinal} leaves no allocation "
                f"steps in a run of {ctx.total_steps} steps",
                hint="lower tinit/tfinal or train for more steps",
            )
        targets = resolve_targets(model, cfg.target_modules, _lora_defaults(model))
        config = AdaLoraConfig(
            task_type=ctx.task_type,
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            deltaT=cfg.delta_t,
            total_step=ctx.total_steps,
            target_modules=targets,
            fan_in_fan_out=_fan_in_fan_out(model, targets),
        )
        return get_peft_model(model, config)

    def callbacks(self, cfg: Any, ctx: MethodContext) -> list[TrainerCallback]:
        return [_adalora_callback()]


ADALORA_STATE = "kiln_adalora.pt"
"""File in each AdaLoRA checkpoint with the rank allocator's state and rank pattern."""


def _adalora_callback() -> TrainerCallback:
    from transformers import TrainerCallback

    class AdaLoraAllocationCallback(TrainerCallback):
        """Rank allocation after each optimizer step, with its state in every checkpoint."""

        def __init__(self) -> None:
            self.pattern: dict[str, Any] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tuner = _adalora_tuner(kwargs["model"])
            self.pattern = _take_pattern(tuner)
            if state.global_step:  # resumed: Trainer loaded checkpoint-<global_step>
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                self.pattern = load_adalora_state(tuner, folder / ADALORA_STATE)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tuner = _adalora_tuner(kwargs["model"])
            tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = self.pattern
            tuner.update_and_allocate(state.global_step)  # the step before this one ends
            self.pattern = _take_pattern(tuner)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Written before Trainer saves the checkpoint into the same folder, so it is in
            # place before the checkpoint-complete marker (written on save).
            if control.should_save and state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                save_adalora_state(_adalora_tuner(kwargs["model"]), self.pattern, folder)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tuner = _adalora_tuner(kwargs["model"])
            pattern = self.pattern
            best = state.best_model_checkpoint
            if args.load_best_model_at_end and best and (Path(best) / ADALORA_STATE).is_file():
                pattern = _read_state(Path(best) / ADALORA_STATE)["rank_pattern"]
            # Back into the config: the final save prunes the adapter to the allocated ranks.
            tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = pattern

    return AdaLoraAllocationCallback()


def _adalora_tuner(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP wrapper
    return model.base_model


def _take_pattern(tuner: Any) -> dict[str, Any] | None:
    """Move the rank pattern out of the peft config (None there = save full-rank weights)."""
    config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern = config.rank_pattern
    config.rank_pattern = None
    return dict(pattern) if pattern else None


def save_adalora_state(tuner: Any, pattern: dict[str, Any] | None, folder: Path) -> Path:
    """Write the rank allocator's state and ``pattern`` to ``folder/kiln_adalora.pt``.

    Args:
        tuner: the ``AdaLoraModel`` (``peft_model.base_model``).
        pattern: the current rank pattern (layer -> kept-rank booleans), None before any.
        folder: the checkpoint folder.
    """
    import torch

    alloc = tuner.rankallocator
    state = {
        "ipt": {k: v.detach().cpu() for k, v in alloc.ipt.items()},
        "exp_avg_ipt": {k: v.detach().cpu() for k, v in alloc.exp_avg_ipt.items()},
        "exp_avg_unc": {k: v.detach().cpu() for k, v in alloc.exp_avg_unc.items()},
        "rank_pattern": pattern,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ADALORA_STATE
    torch.save(state, path)
    return path


def _read_state(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise ConfigError(
            f"AdaLoRA checkpoint {path.parent} has no {ADALORA_STATE} (rank allocator state)",
            hint="it was written by an older modelkiln: train again with resume=false",
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def load_adalora_state(tuner: Any, path: Path) -> dict[str, Any] | None:
    """Restore the rank allocator from ``path`` (see :func:`save_adalora_state`).

    Returns:
        The saved rank pattern.

    Raises:
        ConfigError: the file is missing.
    """
    state = _read_state(path)
    alloc = tuner.rankallocator
    device = next(p.device for p in tuner.parameters())
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, key, {k: v.to(device) for k, v in state[key].items()})
    pattern: dict[str, Any] | None = state["rank_pattern"]
    return pattern


@register("prompt_tuning")
class PromptTuningMethod(TrainingMethod):
    """Prompt tuning: trainable virtual-token embeddings (``peft.PromptTuningConfig``)."""

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        assert isinstance(cfg, PromptTuningMethodConfig)
        text = cfg.init_text is not None
        if text and ctx.tokenizer_dir is None:
            raise ConfigError(
                "prompt_tuning.init_text needs a tokenizer folder",
                hint="pass the tokenizer directory or drop init_text",
            )
        config = PromptTuningConfig(
            task_type=ctx.task_type,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=cfg.init_text,
            tokenizer_name_or_path=ctx.tokenizer_dir if text else None,
        )
        return get_peft_model(model, config)


@register("ia3")
class IA3Method(TrainingMethod):
    """IA3 rescaling vectors (``peft.IA3Config``)."""

    def apply(self, model: nn.Module, cfg: Any, ctx: MethodContext) -> nn.Module:
        from peft import IA3Config, get_peft_model
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
        )
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
        )

        assert isinstance(cfg, IA3MethodConfig)
        kind = _model_type(model)
        default_targets, default_ff = IA3_TARGETS.get(
            kind, (list(PEFT_TARGETS.get(kind, [])), list(PEFT_FF.get(kind, [])))
        )
        targets = resolve_targets(model, cfg.target_modules, default_targets)
        if cfg.feedforward_modules is not None:
            feedforward = cfg.feedforward_modules
        else:
            feedforward = [t for t in default_ff if t in targets]
        unknown = [f for f in feedforward if f not in targets]
        if unknown:
            raise ConfigError(
                f"ia3.feedforward_modules {unknown[0]!r} is not one of target_modules {targets}",
                hint="list only target modules as feed-forward",
            )
        config = IA3Config(
            task_type=ctx.task_type,
            target_modules=targets,
            feedforward_modules=feedforward,
            fan_in_fan_out=_fan_in_fan_out(model, targets),
        )
        return get_peft_model(model, config)
