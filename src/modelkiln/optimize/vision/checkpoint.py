"""A checkpoint format for plain ``torch.nn.Module`` models, and its safe loader.

A checkpoint is a directory::

    module.json         {"format": "modelkiln-torch-module", "version": 1,
                         "class": "package.module:ClassName", "kwargs": {...}}
    model.safetensors   the module's state dict (tensors only)

:func:`load_module` imports ``class`` (it must be a ``torch.nn.Module`` subclass importable in
this environment: only installed code runs, never code from the checkpoint), builds it with
the JSON ``kwargs`` and loads the tensors strictly (every key present, every shape equal).
A ``torch.export`` program (a ``.pt2`` file) loads too, as its module. A pickled ``.pt`` /
``.pth`` / ``.bin`` file is read only with ``torch.load(weights_only=True)``: a pickled whole
module (which would run arbitrary code) is refused, and a bare state dict is refused with a
hint because it does not say which class to build.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.optimize.vision.model import eval_mode

FORMAT = "modelkiln-torch-module"
VERSION = 1
META = "module.json"
WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def class_path(cls: type) -> str:
    """``package.module:QualName`` of ``cls`` (what ``module.json`` stores)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def save_module(model: nn.Module, path: str | Path, kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``module.json`` + ``model.safetensors`` checkpoint directory.

    Args:
        model: the module; its class must be importable (not defined in a function).
        path: the directory (created).
        kwargs: JSON-able constructor arguments that rebuild its layout; when None, the
            model's ``init_kwargs()`` if it has one, else ``{}``.

    Raises:
        ConfigError: the class is local (cannot be imported back) or ``kwargs`` is not JSON.
    """
    from safetensors.torch import save_file

    cls = type(model)
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise ConfigError(
            f"cannot checkpoint {cls.__qualname__}: the class is not importable by name",
            hint="define the module class at the top level of an importable Python module",
        )
    if kwargs is None:
        init = getattr(model, "init_kwargs", None)
        kwargs = init() if callable(init) else {}
    try:
        meta = json.dumps(
            {"format": FORMAT, "version": VERSION, "class": class_path(cls), "kwargs": kwargs},
            indent=2,
        )
    except TypeError as exc:
        raise ConfigError(
            f"constructor kwargs of {cls.__qualname__} are not JSON: {exc}",
            hint="pass only numbers, strings, booleans, lists and dicts as kwargs",
        ) from exc
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # contiguous clones: safetensors refuses shared / strided storage.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / META).write_text(meta + "\n", encoding="utf-8")
    return out


def load_module(path: str | Path) -> nn.Module:
    """Load a plain-module checkpoint (directory or ``.pt2``) in eval mode.

    Raises:
        ArtifactError: the path is missing, ``module.json`` is malformed, the weights do not
            match the class, or the file is a pickle this loader refuses.
        ConfigError: the named class cannot be imported, is no ``nn.Module``, or rejects
            the kwargs.
    """
    src = Path(path)
    if not src.exists():
        raise ArtifactError(
            f"no module checkpoint at {src}",
            hint="pass a directory written by save_module() or a torch.export .pt2 file",
        )
    if src.is_dir():
        model = _load_dir(src)
    elif src.suffix == ".pt2":
        model = _exported_module(src)
    elif src.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(src)
    else:
        raise ArtifactError(
            f"unknown module checkpoint {src.name} (expected a directory with {META}, or .pt2)",
            hint="save the model with modelkiln.optimize.vision.save_module()",
        )
    return eval_mode(model)


def _exported_module(src: Path) -> nn.Module:
    """The module of a ``torch.export`` program, usable by code that calls ``train(False)``."""
    module = torch.export.load(str(src)).module()
    # ExportedProgram.module() installs train() / eval() stubs that raise (its graph is fixed:
    # the flags cannot change what it computes). The ONNX exporter and predict() call
    # train(False); the base methods only set the flags, so drop the stubs.
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


def _read_meta(src: Path) -> dict[str, Any]:
    meta_path = src / META
    if not meta_path.is_file():
        raise ArtifactError(
            f"{src} has no {META}", hint="save the model with save_module(), which writes it"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path} is not valid JSON: {exc}", hint="re-save it") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{meta_path} is not a {FORMAT} file (format={meta.get('format')!r})"
            if isinstance(meta, dict)
            else f"{meta_path} must hold a JSON object",
            hint="save the model with save_module()",
        )
    if meta.get("version") != VERSION:
        raise ArtifactError(
            f"{meta_path} has version {meta.get('version')!r}; this loader reads {VERSION}",
            hint="re-save the model with this modelkiln version",
        )
    if not isinstance(meta.get("kwargs", {}), dict):
        raise ArtifactError(f"{meta_path}: 'kwargs' must be an object", hint="fix module.json")
    return meta


def import_class(spec: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named ``package.module:ClassName``.

    Raises:
        ConfigError: malformed name, module or attribute missing, or not an ``nn.Module``.
    """
    module_name, sep, qualname = str(spec).partition(":")
    if not sep or not module_name or not qualname:
        raise ConfigError(
            f"module class {spec!r} is not of the form 'package.module:ClassName'",
            hint="write e.g. 'modelkiln.optimize.vision.model:DigitsCNN' in module.json",
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {module_name!r} for module class {spec!r}: {exc}",
            hint="install the package that defines the class, or fix 'class' in module.json",
        ) from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{module_name!r} has no attribute {qualname!r} (module class {spec!r})",
                hint="check the class name in module.json",
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ConfigError(
            f"{spec!r} is not a torch.nn.Module subclass", hint="name the model's class"
        )
    return obj


def _load_dir(src: Path) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = _read_meta(src)
    cls = import_class(meta.get("class", ""))
    kwargs = meta.get("kwargs", {})
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"{meta['class']} rejects the kwargs {kwargs!r} of {src / META}: {exc}",
            hint="make 'kwargs' in module.json match the class's constructor",
        ) from exc
    weights = src / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{src} has no {WEIGHTS}", hint="re-save the model with save_module()")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights} cannot be read: {exc}", hint="re-save it") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ArtifactError(
            f"{weights} does not fit {meta['class']}(**{kwargs!r}): "
            + " ".join(line.strip() for line in first[:3]),
            hint="the kwargs in module.json must rebuild the saved layout (widths, classes)",
        ) from exc
    return model


def _refuse_pickle(src: Path) -> NoReturn:
    import pickle

    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise ArtifactError(
            f"refusing to unpickle {src.name}: it holds more than tensors (a pickled module "
            "runs arbitrary code when loaded)",
            hint="load it once where you trust it and re-save with save_module(), or export "
            "it with torch.export.save() to a .pt2 file",
        ) from exc
    kind = "a state dict" if isinstance(obj, dict) else type(obj).__name__
    raise ArtifactError(
        f"{src.name} holds {kind} but no architecture: it cannot be loaded as a module",
        hint=f"write it as a checkpoint directory: {META} naming the class + {WEIGHTS} "
        "(save_module() does both)",
    )
