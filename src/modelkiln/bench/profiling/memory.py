"""Training memory of a torch model: estimated (parameters, gradients, Adam, activations)
against the peak measured over one real training step.

Estimate, per the usual accounting (the handbook's version counts Adam as 1x):
parameters + gradients (1x the trainable parameters) + Adam's two moments (2x
the trainable parameters, in their dtype) + activations. Activations are measured, not
guessed: forward hooks record the bytes each leaf module outputs at the given
batch and sequence length, summed per layer (the module path up to its
index, e.g. ``encoder.layer.0``) — roughly what autograd keeps for backward.
The measured peak is the process's RSS high-water mark over one forward,
backward and Adam step, sampled every millisecond (CUDA: the allocator's peak).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

_LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block|blocks)\.\d+)")


def _layer_of(name: str) -> str:
    m = _LAYER.match(name)
    return m.group(1) if m else name.split(".")[0] or "(root)"


def _nbytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, tuple | list):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    if hasattr(obj, "to_tuple"):
        return sum(_nbytes(o) for o in obj.to_tuple())
    return 0


def activations_per_layer(model: Any, inputs: dict[str, Any]) -> dict[str, int]:
    """Bytes output by leaf modules in one forward pass, summed per layer."""
    import torch

    per_layer: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):

            def hook(_m: Any, _i: Any, out: Any, key: str = _layer_of(name)) -> None:
                per_layer[key] = per_layer.get(key, 0) + _nbytes(out)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return per_layer


class _PeakSampler:
    """RSS high-water mark over a block, sampled in a thread (CPU has no allocator peak)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> _PeakSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _train_step_peak(model: Any, inputs: dict[str, Any]) -> tuple[float, str]:
    import torch

    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with _PeakSampler() as s:
        out = model(**inputs)
        main = out[0] if isinstance(out, tuple) else next(iter(out.values()))
        main.float().mean().backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    if cuda:
        return (torch.cuda.max_memory_allocated() - start) / 2**20, "cuda max_memory_allocated"
    return (s.peak - s.base) / 2**20, "RSS high-water mark over one training step"


def memory_analysis(model: Any, inputs: dict[str, Any], measure: bool = True) -> dict[str, Any]:
    """Parameters, gradients, Adam state, activations per layer; estimate vs measured peak (MB).

    The measured peak is the growth over memory already held (the model's weights
    are loaded before), so it is compared with the estimate minus the weights.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    # Adam's two moments per parameter, in the parameter's dtype (torch.optim.Adam's state)
    adam = sum(2 * p.numel() * p.element_size() for p in trainable)
    layers = activations_per_layer(model, inputs)
    acts = sum(layers.values())
    mb = 2**20
    out: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "params_mb": params / mb,
        "grads_mb": grads / mb,
        "adam_state_mb": adam / mb,
        "activations_mb": acts / mb,
        "estimated_training_mb": (params + grads + adam + acts) / mb,
        "estimated_step_growth_mb": (grads + adam + acts) / mb,
        "activations_per_layer_mb": {k: v / mb for k, v in layers.items()},
    }
    if measure:
        peak, how = _train_step_peak(model, inputs)
        out["measured_step_growth_mb"] = peak
        out["measured_how"] = how
    return out
