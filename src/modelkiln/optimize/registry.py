"""Optimization variants chosen by name: the registry and the contract a variant implements.

A variant turns the fp32 reference model into a saved artifact directory
(:meth:`Variant.build`) and loads that directory back as a
:class:`~modelkiln.optimize.runners.Runner` (:meth:`Variant.load`). Adding a
method = one class registered here + a row in the shared test matrix::

    @VARIANTS.register("onnx-fp32")
    class OnnxFp32Variant(Variant):
        family = "export"
        ...

Importing this module does not import torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from modelkiln.errors import ConfigError
from modelkiln.optimize.tolerance import Family, Tolerance

if TYPE_CHECKING:
    import torch

    from modelkiln.optimize.config import OptimizeConfig
    from modelkiln.optimize.runners import ModelInfo, Runner

T = TypeVar("T")
"""Written into every variant directory: its name, backend, task and build facts."""


class Registry(Generic[T]):
    """Name -> object, filled by the ``@register(name)`` decorator.

    Example:
        >>> REG: Registry[type] = Registry("widget")
        >>> @REG.register("blue")
        ... class Blue: ...
        >>> REG.get("blue") is Blue
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name`` (a duplicate name is a bug)."""

        def decorate(obj: T) -> T:
            assert name not in self._items, f"{self.kind} {name!r} registered twice"
            self._items[name] = obj
            if isinstance(obj, type) and hasattr(obj, "name"):
                obj.name = name
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests register throwaway entries)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names: built-in modules in :data:`BUILTIN_MODULES` order, then the rest.

        Within a module, registration order. The order does not depend on which module
        happened to be imported first.
        """
        _load_builtin_variants()
        rank = {m: i for i, m in enumerate(BUILTIN_MODULES)}
        order = list(self._items)

        def key(name: str) -> tuple[int, int]:
            module = getattr(self._items[name], "__module__", "")
            return rank.get(module, len(rank)), order.index(name)

        return sorted(order, key=key)

    def _unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise ``ValueError`` listing the valid names."""
        if name not in self.names():
            raise ValueError(self._unknown(name))
        return name

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            ConfigError: ``name`` is not registered (the message lists the valid names).
        """
        if name not in self.names():
            raise ConfigError(self._unknown(name), hint="pick one of the valid names")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names()


@dataclass
class BuildContext:
    """What a variant gets to build from.

    Attributes:
        spec: the source model directory and its kind.
        reference: the fp32 reference model (eval mode); variants must not modify it.
        cfg: the optimize config.
        samples: real (tokenized) input batches, for calibration and checks.
        train_batches: tokenized training batches (``input_ids``, ``attention_mask``; never
            the held-out evaluation data) for methods that train: recovery fine-tuning after
            pruning, distillation, quantization-aware training. Causal LMs use the inputs as
            labels; encoders learn from the reference model's outputs (no labels needed).
            Empty when the caller has none; such methods then raise a ConfigError.
    """

    spec: ModelInfo
    reference: torch.nn.Module
    cfg: OptimizeConfig
    samples: list[dict[str, torch.Tensor]] = field(default_factory=list)
    train_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)


class Variant(ABC):
    """One way to run the model: a build step writing a directory and a loader reading it back."""

    name: ClassVar[str] = ""
    family: ClassVar[Family] = "quantization"
    backend: ClassVar[Literal["torch", "onnxruntime"]] = "torch"
    tolerance: ClassVar[Tolerance] = Tolerance(atol=1e-5)
    summary: ClassVar[str] = ""

    def unsupported(self, spec: ModelInfo) -> str | None:
        """Why this variant cannot handle ``spec`` (one line), or None when it can."""
        return None

    def parity_reference(self, ctx: BuildContext) -> torch.nn.Module:
        """The model the saved variant must reproduce within :attr:`tolerance`.

        The fp32 source by default. Methods that change the function on purpose
        (pruning, distillation) return their own in-memory result, so parity checks
        save-and-reload, while the quality gate judges the change itself.
        """
        return ctx.reference

    def not_default_here(self) -> str | None:
        """Why this variant is left out of the default candidates on this machine, or None."""
        return None

    @abstractmethod
    def build(self, ctx: BuildContext, out: Path) -> dict[str, Any]:
        """Write the variant into ``out`` (an empty directory); return facts for its card."""

    @abstractmethod
    def load(self, path: Path, threads: int | None = None) -> Runner:
        """Load the directory written by :meth:`build` as a runner."""


VARIANTS: Registry[type[Variant]] = Registry("optimization method")
"""Every optimization variant, by name (``torch-fp32``, ``onnx-int8-dynamic``, ...)."""


BUILTIN_MODULES = (
    "modelkiln.optimize.quantize",
    "modelkiln.optimize.edge",
    "modelkiln.optimize.int4",
    "modelkiln.optimize.quant_static",
    "modelkiln.optimize.qat",
    "modelkiln.optimize.tensorrt",
    "modelkiln.optimize.distill.variants",
    "modelkiln.optimize.prune.variants",
)
"""Modules whose classes register themselves, in the order ``VARIANTS.names()`` lists them."""


def _load_builtin_variants() -> None:
    """Import the modules whose classes register themselves (light: no torch at import)."""
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)
