"""Per-layer int8 quantization error on real activations (the lecture's quantization theory).

Forward hooks on every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the fp32 model
capture each layer's real input ``x`` and output ``y = x W^T + b`` while the
model runs on sample batches; each layer is re-run on the same ``x`` with
*fake-quantized* int8 weights and activations (quantize, round, clamp,
dequantize), and the difference is accumulated:

* MSE = mean((y_q - y)^2)
* SNR dB = 10 log10(sum y^2 / sum (y_q - y)^2); about 6 dB per bit, so int8 on a
  well-scaled layer gives ~35-45 dB and an outlier-heavy one much less
* max abs error = max |y_q - y|

Schemes mirror the two int8 backends: ``torchao-int8-dynamic`` (symmetric
per-channel weights, symmetric per-token activations) and
``ort-int8-dynamic`` (symmetric per-channel weights, asymmetric uint8
per-tensor activations).

Example:
    >>> rows = layer_error_report(model, batches, scheme="ort-int8-dynamic")
    >>> print(render_layer_error(rows, "ort-int8-dynamic"))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SCHEMES = {
    "torchao-int8-dynamic": ("per-channel", "per-token-symmetric"),
    "ort-int8-dynamic": ("per-channel", "per-tensor-asymmetric"),
    "int8-per-tensor": ("per-tensor", "per-tensor-symmetric"),
}


@dataclass
class LayerError:
    """The int8 error of one linear layer, over every sample token."""

    name: str
    kind: str
    in_features: int
    out_features: int
    mse: float
    snr_db: float
    max_abs: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def fake_quant_weight(weight: torch.Tensor, granularity: str, bits: int = 8) -> torch.Tensor:
    """Symmetric ``bits``-bit weight ``(out, in)``: one scale per output row, or per tensor."""
    amax = (
        weight.abs().amax(dim=1, keepdim=True)
        if granularity == "per-channel"
        else weight.abs().max()
    )
    top = 2 ** (bits - 1) - 1
    scale = amax.clamp(min=1e-12) / top
    return (weight / scale).round().clamp(-top, top) * scale


def fake_quant_activation(x: torch.Tensor, mode: str) -> torch.Tensor:
    """int8 activation ``(..., in)``: symmetric per token, or asymmetric uint8 per tensor."""
    if mode == "per-token-symmetric":
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        return (x / scale).round().clamp(-127, 127) * scale
    if mode == "per-tensor-symmetric":
        scale = x.abs().max().clamp(min=1e-12) / 127
        return (x / scale).round().clamp(-127, 127) * scale
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero = (-low / scale).round()
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero) * scale


class _LayerProbe:
    """Forward hook: re-runs one linear layer on its real input with fake-quantized int8."""

    def __init__(self, weight: torch.Tensor, w_gran: str, a_mode: str, bits: int) -> None:
        self.weight_q = fake_quant_weight(weight.detach().float(), w_gran, bits)  # (out, in)
        self.a_mode = a_mode
        self.noise = self.signal = self.max_abs = 0.0
        self.count = self.tokens = 0

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        import torch

        x, y = args[0].detach().float(), output.detach().float()  # (..., in), (..., out)
        bias = getattr(module, "bias", None)
        y_q = torch.nn.functional.linear(
            fake_quant_activation(x, self.a_mode),
            self.weight_q,
            None if bias is None else bias.float(),
        )
        err = y_q - y
        self.noise += float(err.pow(2).sum())
        self.signal += float(y.pow(2).sum())
        self.max_abs = max(self.max_abs, float(err.abs().max()))
        self.count += err.numel()
        self.tokens += err.numel() // err.shape[-1]

    def result(self, name: str, kind: str) -> LayerError:
        """The accumulated error of this layer."""
        snr = 200.0 if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-30) / self.noise)
        out_f, in_f = self.weight_q.shape
        mse = self.noise / self.count
        return LayerError(name, kind, in_f, out_f, mse, min(snr, 200.0), self.max_abs, self.tokens)


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.Tensor, str]]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D``: name -> (module, weight as (out, in), kind)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    layers: dict[str, tuple[torch.nn.Module, torch.Tensor, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = (module, module.weight, "Linear")
        elif isinstance(module, Conv1D):
            layers[name] = (module, module.weight.T, "Conv1D")
    return layers


def layer_error_report(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    scheme: str = "torchao-int8-dynamic",
    weight_bits: int = 8,
) -> list[LayerError]:
    """Run ``model`` (fp32) on ``batches``; return every linear layer's int8 error, worst SNR first.

    ``weight_bits=7`` models ORT's ``reduce_range``. Rounding and clipping are
    modelled; kernel-specific int16 saturation (AVX2 u8s8) is not.

    Raises:
        ValueError: unknown ``scheme`` (an internal choice, not user input).
    """
    import torch

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    w_gran, a_mode = SCHEMES[scheme]
    layers = linear_layers(model)
    probes = {n: _LayerProbe(w, w_gran, a_mode, weight_bits) for n, (_, w, _) in layers.items()}
    handles = [m.register_forward_hook(probes[n]) for n, (m, _, _) in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = [probes[n].result(n, kind) for n, (_, _, kind) in layers.items() if probes[n].count]
    return sorted(rows, key=lambda r: r.snr_db)


def render_layer_error(
    rows: list[LayerError], scheme: str, top: int | None = None, weight_bits: int = 8
) -> str:
    """A markdown table, worst layers first (all of them unless ``top``)."""
    shown = rows if top is None else rows[:top]
    w_gran, a_mode = SCHEMES[scheme]
    lines = [
        f"# Per-layer int8 error ({scheme}: {weight_bits}-bit weights {w_gran}, "
        f"int8 activations {a_mode})",
        "",
        f"{len(rows)} layers, on {rows[0].tokens if rows else 0} sample tokens each; "
        "worst SNR first.",
        "",
        "| layer | kind | in x out | MSE | SNR dB | max abs err |",
        "|---|---|---|---|---|---|",
    ]
    for r in shown:
        lines.append(
            f"| `{r.name}` | {r.kind} | {r.in_features}x{r.out_features} | {r.mse:.3g} | "
            f"{r.snr_db:.1f} | {r.max_abs:.3g} |"
        )
    return "\n".join(lines) + "\n"
