"""Distillation building blocks: find the layer stack, build students, the losses, the loop.

Works on Hugging Face encoders (BERT / MiniLM: ``encoder.layer``) and causal LMs
(GPT-2: ``transformer.h``; Llama-style: ``model.layers``). A student is the
teacher with fewer layers (copied from the teacher's, see
:func:`student_from_teacher`) or a fresh, smaller model from the teacher's
config (:func:`student_from_scratch`); either way it is a plain transformers
model whose ``config.json`` states its depth, so ``from_pretrained`` reloads it.

Example:
    >>> result = distill(teacher, batches, DistillConfig(student_layers=3), causal=False)
    >>> save_student(result.student, "out/student", source_dir="teacher_dir")
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modelkiln.errors import ConfigError
from modelkiln.optimize.distill.config import DistillConfig, default_layer_map

LAYER_PATHS = ("encoder.layer", "transformer.h", "model.layers", "gpt_neox.layers", "layers")
"""Where the transformer blocks live: BERT-style, GPT-2, Llama-style, GPT-NeoX, bare bases."""
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
LOG_EVERY = 25
"""Log the losses every this many steps."""
log = logging.getLogger(__name__)


def find_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the block stack and the stack's attribute name on it.

    Raises:
        ConfigError: no known block stack (``encoder.layer``, ``transformer.h``, ...).
    """
    for path in LAYER_PATHS:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        if isinstance(getattr(parent, name, None), torch.nn.ModuleList):
            return parent, name
    raise ConfigError(
        f"cannot find the transformer blocks of {type(model).__name__} "
        f"(looked for {', '.join(LAYER_PATHS)})",
        hint="distill BERT-style encoders, GPT-2 or Llama-style causal LMs",
    )


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks."""
    parent, name = find_layers(model)
    return len(getattr(parent, name))


def _set_depth(model: torch.nn.Module, layers: list[torch.nn.Module], picked: list[int]) -> None:
    """Install ``layers`` as the block stack and make the config agree with it."""
    parent, name = find_layers(model)
    setattr(parent, name, torch.nn.ModuleList(layers))
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():  # attention modules index their KV-cache slot
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_idx)  # noqa: B010 (typed as Module attr)
    config: Any = model.config
    config.num_hidden_layers = len(layers)  # GPT-2 maps this onto n_layer
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > max(picked):
        config.layer_types = [layer_types[i] for i in picked]


def student_from_teacher(teacher: torch.nn.Module, layer_map: Sequence[int]) -> torch.nn.Module:
    """A copy of ``teacher`` keeping only the blocks ``layer_map`` (0-based, in order).

    Embeddings, final norm, pooler and LM head are copied unchanged.

    Raises:
        ConfigError: a layer index is out of range.
    """
    depth = num_layers(teacher)
    picked = list(layer_map)
    if not picked or min(picked) < 0 or max(picked) >= depth:
        raise ConfigError(
            f"layer_map {picked} does not fit a {depth}-layer teacher",
            hint=f"give 0-based teacher layers in 0..{depth - 1}",
        )
    student = copy.deepcopy(teacher)
    parent, name = find_layers(student)
    blocks = getattr(parent, name)
    _set_depth(student, [blocks[i] for i in picked], picked)
    return student.eval()


def student_from_scratch(
    teacher: torch.nn.Module, layers: int, hidden_size: int | None = None, seed: int = 0
) -> torch.nn.Module:
    """A freshly initialised model of the teacher's architecture with ``layers`` blocks.

    ``hidden_size`` (default: the teacher's) changes the width; the FFN scales
    with it and the head count stays. Embeddings (and position embeddings) are
    copied from the teacher when the width matches.
    """
    config: Any = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    width = int(getattr(config, "hidden_size", 0))
    if hidden_size and hidden_size != width:
        heads = int(config.num_attention_heads)
        if hidden_size % heads:
            raise ConfigError(
                f"student_hidden_size {hidden_size} is not a multiple of the "
                f"{heads} attention heads",
                hint=f"pick a multiple of {heads}",
            )
        ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        config.hidden_size = hidden_size  # GPT-2 maps this onto n_embd
        if getattr(config, "head_dim", None):
            config.head_dim = hidden_size // heads
        if ffn:
            scaled = int(ffn * hidden_size / width)
            if hasattr(config, "intermediate_size"):
                config.intermediate_size = scaled
            else:
                config.n_inner = scaled
    torch.manual_seed(seed)
    student: Any = type(teacher)(config)
    source: Any = teacher
    if config.hidden_size == width:
        student.get_input_embeddings().load_state_dict(source.get_input_embeddings().state_dict())
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    result: torch.nn.Module = student.eval()
    return result


# --- losses ---------------------------------------------------------------------------------


def logit_kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over unmasked tokens.

    The ``T^2`` factor keeps the gradient scale independent of ``T`` (Hinton et al.).
    """
    keep = mask.bool()
    s = F.log_softmax(student[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str
) -> torch.Tensor:
    """Distance of token states ``(B, T, H)`` over unmasked tokens: MSE or 1 - cosine."""
    keep = mask.bool()
    s, t = student[keep], teacher[keep]
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the unmasked token states (sentence-transformers' MiniLM pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pooled_cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - cosine of the mean-pooled sentence embeddings, mean over the batch."""
    return (1 - F.cosine_similarity(mean_pool(student, mask), mean_pool(teacher, mask))).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows ``(B, H, T, T)``, mean over real query tokens.

    Different head counts are compared after averaging over heads.
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    t = teacher.float().clamp(min=1e-12)
    s = student.float().clamp(min=1e-12)
    kl = (t * (t.log() - s.log())).sum(-1)  # (B, H, T)
    rows = mask.bool().unsqueeze(1).expand_as(kl)
    return kl[rows].mean()


# --- training -------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """A distilled student and how it got there.

    Attributes:
        student: the trained student (eval mode, the teacher's attention implementation).
        layer_map: the teacher layer each student layer started from / was matched to.
        losses: one dict per optimizer step: ``total`` and each active term.
        stages: student depth per stage (one entry unless progressive).
    """

    student: torch.nn.Module
    layer_map: list[int]
    losses: list[dict[str, float]] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Facts for a variant card: depth, map, steps, first / last loss per term."""
        first, last = (self.losses[0], self.losses[-1]) if self.losses else ({}, {})
        return {
            "student_layers": len(self.layer_map),
            "layer_map": self.layer_map,
            "stages": self.stages,
            "steps": len(self.losses),
            "loss_first": {k: round(v, 6) for k, v in first.items()},
            "loss_last": {k: round(v, 6) for k, v in last.items()},
        }


def _width(model: torch.nn.Module) -> int:
    config: Any = model.config
    return int(getattr(config, "hidden_size", 0) or config.n_embd)


def _projections(student: torch.nn.Module, teacher: torch.nn.Module, n: int) -> torch.nn.ModuleList:
    """One learned linear map per student layer from its width to the teacher's.

    Identity at the start when the widths match, so a student copied from the
    teacher's layers starts from the plain hidden-state distance.
    """
    s_width, t_width = _width(student), _width(teacher)
    projs = torch.nn.ModuleList(torch.nn.Linear(s_width, t_width) for _ in range(n))
    if s_width == t_width:
        with torch.no_grad():
            for proj in projs:
                assert isinstance(proj, torch.nn.Linear)
                proj.weight.copy_(torch.eye(t_width))
                proj.bias.zero_()
    return projs


def _eager(model: torch.nn.Module) -> None:
    model.set_attn_implementation("eager")  # type: ignore[operator]


def _attn_impl(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "sdpa")


def check_batches(batches: Sequence[dict[str, torch.Tensor]], method: str) -> None:
    """Raise a ConfigError when there is no training data.

    Raises:
        ConfigError: ``batches`` is empty.
    """
    if not batches:
        raise ConfigError(
            f"{method} needs training batches (input_ids, attention_mask), got none",
            hint="give the optimize stage training data (optimize.data.train_batches > 0) "
            "or pick a method that does not train",
        )


def distill(
    teacher: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    cfg: DistillConfig,
    causal: bool,
    *,
    student: torch.nn.Module | None = None,
    layer_map: Sequence[int] | None = None,
    steps: int | None = None,
) -> DistillResult:
    """Train a student to imitate ``teacher`` on ``batches`` (cycled) for ``cfg.steps`` steps.

    Args:
        teacher: the source model (eval mode); not modified.
        batches: tokenized batches (``input_ids``, ``attention_mask``[, ``token_type_ids``]).
        cfg: losses, weights and optimizer settings.
        causal: the teacher is a causal LM (logit + LM loss apply; labels = inputs).
        student: start from this model (progressive stages); default: built per ``cfg.init``.
        layer_map: teacher layer per student layer; default ``cfg.layer_map`` or evenly spaced.
        steps: override ``cfg.steps``.

    Raises:
        ConfigError: no batches, or a student / layer map that does not fit the teacher.
    """
    from transformers import get_linear_schedule_with_warmup

    check_batches(batches, "distillation")
    depth = num_layers(teacher)
    n = len(layer_map) if layer_map is not None else cfg.target_layers(depth)
    picked = list(layer_map or cfg.layer_map or default_layer_map(depth, n))
    if max(picked) >= depth:
        raise ConfigError(
            f"layer_map {picked} does not fit a {depth}-layer teacher",
            hint=f"give 0-based teacher layers in 0..{depth - 1}",
        )
    if student is None:
        student = (
            student_from_teacher(teacher, picked)
            if cfg.init == "teacher-layers"
            else student_from_scratch(teacher, len(picked), cfg.student_hidden_size, cfg.seed)
        )
    if num_layers(student) != len(picked):
        raise ConfigError(
            f"the student has {num_layers(student)} layers but the layer map {picked} "
            f"has {len(picked)}",
            hint="give one teacher layer per student layer",
        )
    impl = _attn_impl(teacher)
    use_att = cfg.attention_weight > 0
    use_hidden = cfg.hidden_weight > 0
    use_pooled = cfg.pooled_weight > 0 and not causal
    use_logits = causal and cfg.logit_weight > 0
    if use_att:  # attention probabilities are only returned by the eager kernels
        teacher = copy.deepcopy(teacher)
        _eager(teacher)
        _eager(student)
    student.requires_grad_(True)  # a copy of a frozen teacher would not train otherwise
    torch.manual_seed(cfg.seed)
    projs = _projections(student, teacher, len(picked))
    params = [*student.parameters(), *projs.parameters()]
    total_steps = steps or cfg.steps
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total_steps), total_steps)
    # Eval mode while training: dropout off. Short distillation runs converge faster and
    # reproducibly without it (the teacher's outputs already act as soft targets).
    student.eval()
    history: list[dict[str, float]] = []
    extra: dict[str, Any] = {"use_cache": False} if causal else {}
    want = {"output_hidden_states": use_hidden or use_pooled, "output_attentions": use_att}
    for batch in itertools.islice(itertools.cycle(batches), total_steps):
        feed = {k: v for k, v in batch.items() if k in INPUT_NAMES}
        mask = feed.get("attention_mask", torch.ones_like(feed["input_ids"]))
        with torch.no_grad():
            t_out = teacher(**feed, **want, **extra)
        labels = feed["input_ids"].masked_fill(mask == 0, -100) if use_logits else None
        s_out = student(**feed, **want, **extra, **({"labels": labels} if use_logits else {}))
        terms: dict[str, torch.Tensor] = {}
        if use_logits:
            kd = logit_kd_loss(s_out.logits, t_out.logits, mask, cfg.temperature)
            terms["logit"] = cfg.alpha * kd + (1 - cfg.alpha) * s_out.loss
        if use_hidden:
            per_layer = [
                hidden_loss(
                    proj(s_out.hidden_states[i + 1]),
                    t_out.hidden_states[j + 1],
                    mask,
                    cfg.hidden_loss,
                )
                for i, (j, proj) in enumerate(zip(picked, projs, strict=True))
            ]
            terms["hidden"] = torch.stack(per_layer).mean()
        if use_pooled:
            terms["pooled"] = pooled_cosine_loss(
                projs[-1](s_out.hidden_states[-1]), t_out.hidden_states[-1], mask
            )
        if use_att:
            terms["attention"] = torch.stack(
                [
                    attention_kl(s_out.attentions[i], t_out.attentions[j], mask)
                    for i, j in enumerate(picked)
                ]
            ).mean()
        if not terms:
            raise ConfigError(
                "every distillation loss weight is 0 for this model",
                hint="set distill.hidden_weight, pooled_weight (encoders), logit_weight "
                "(causal LMs) or attention_weight above 0",
            )
        weights = {
            "logit": cfg.logit_weight,
            "hidden": cfg.hidden_weight,
            "pooled": cfg.pooled_weight,
            "attention": cfg.attention_weight,
        }
        loss = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        history.append(
            {"total": float(loss.detach())} | {k: float(v.detach()) for k, v in terms.items()}
        )
        if len(history) % LOG_EVERY == 0 or len(history) == total_steps:
            log.info("distill step %d/%d: %s", len(history), total_steps, history[-1])
    if use_att:
        student.set_attn_implementation(impl)  # type: ignore[operator]
    student.requires_grad_(False)
    return DistillResult(student.eval(), picked, history, [len(picked)])


def progressive_distill(
    teacher: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    cfg: DistillConfig,
    causal: bool,
) -> DistillResult:
    """Distil in stages of decreasing depth (``cfg.stage_depths``), e.g. 6 -> 4 -> 3.

    Stage 1's student is built from the teacher's layers; each later stage's
    student keeps evenly spaced layers of the previous stage's student. Every
    stage learns from the original teacher, each student layer matched to the
    teacher layer it descends from; each stage runs ``cfg.steps`` steps
    (``cfg.layer_map`` is not used: the maps follow from the stages).

    Raises:
        ConfigError: no batches, or stages that do not fit the teacher.
    """
    check_batches(batches, "progressive distillation")
    depth = num_layers(teacher)
    depths = cfg.stage_depths(depth)
    result: DistillResult | None = None
    history: list[dict[str, float]] = []
    for stage, n in enumerate(depths):
        if result is None:
            result = distill(teacher, batches, cfg, causal, layer_map=default_layer_map(depth, n))
        else:
            keep = default_layer_map(len(result.layer_map), n)
            student = student_from_teacher(result.student, keep)
            mapped = [result.layer_map[i] for i in keep]
            result = distill(teacher, batches, cfg, causal, student=student, layer_map=mapped)
        history += [{"stage": float(stage)} | row for row in result.losses]
    assert result is not None
    return DistillResult(result.student, result.layer_map, history, depths)


def save_student(
    student: torch.nn.Module, out: str | Path, source_dir: str | Path | None = None
) -> Path:
    """``save_pretrained`` the student (its config states its depth) plus the source's
    tokenizer / pooling files; ``AutoModel.from_pretrained(out)`` reloads it."""
    from modelkiln.optimize.runners import copy_side_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)  # type: ignore[operator]
    if source_dir is not None:
        copy_side_files(Path(source_dir), out)
    return out
