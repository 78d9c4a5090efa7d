"""Untrusted checkpoints: pickle files are refused unless explicitly allowed, then allowlisted.

Deny-list scanners (modelscan, picklescan's own verdict) have been bypassed
again and again, so the verdict here is an allowlist: ``picklescan`` only
extracts every global a pickle would import, and anything outside
:data:`ALLOWED_GLOBALS` (the globals ``torch.save`` of a state dict uses) is
refused.

Example:
    >>> check_checkpoint("model/pytorch_model.bin", allow_pickle=False)
    Traceback (most recent call last):
    SecurityError: refusing pickle checkpoint ...
"""

from __future__ import annotations

from pathlib import Path

from modelkiln.errors import SecurityError, require

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

#: Globals a ``torch.save``-d state dict may import (module, name).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch", "device"),
    }
    | {
        ("torch", f"{t}Storage")
        for t in (
            "Float",
            "Double",
            "Half",
            "BFloat16",
            "Long",
            "Int",
            "Short",
            "Char",
            "Byte",
            "Bool",
        )
    }
    | {
        ("torch", dt)
        for dt in ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
    }
)


def is_pickle(path: str | Path) -> bool:
    """Whether the file ``path`` is a pickle-based checkpoint (by suffix)."""
    return Path(path).suffix in PICKLE_SUFFIXES


def loaded_pickles(model_dir: str | Path) -> list[Path]:
    """The pickled weights a loader would read from ``model_dir``.

    Only ``pytorch_model*.bin`` / ``adapter_model.bin`` at the top level: transformers and
    peft read nothing else when no safetensors exist. Other pickles there (the Trainer's
    ``training_args.bin``, checkpoint folders, a TorchScript ``model.pt``) are never loaded
    by the server, so they do not block it.
    """
    return sorted(
        f
        for f in Path(model_dir).glob("*.bin")
        if f.is_file() and f.name.startswith(("pytorch_model", "adapter_model"))
    )


def scan_pickle(path: str | Path) -> list[str]:
    """The globals of ``path`` that are not on the allowlist (``module.name``)."""
    require("picklescan", "security", purpose="scanning pickle checkpoints")
    from picklescan.scanner import scan_file_path  # nosec B403 (a scanner: reads opcodes, never unpickles)

    result = scan_file_path(str(path))
    if result.scan_err:
        return [f"<unreadable pickle {Path(path).name}>"]
    return sorted(
        f"{g.module}.{g.name}" for g in result.globals if (g.module, g.name) not in ALLOWED_GLOBALS
    )


def check_checkpoint(path: str | Path, allow_pickle: bool) -> list[Path]:
    """Refuse the pickled weights of ``path`` unless allowed and clean; return those accepted.

    Raises:
        SecurityError: a pickle file and ``allow_pickle`` is off, or it imports a global
            outside the allowlist (named in the message).
    """
    path = Path(path)
    pickles = ([path] if is_pickle(path) else []) if path.is_file() else loaded_pickles(path)
    if pickles and not allow_pickle:
        raise SecurityError(
            f"refusing pickle checkpoint {pickles[0]} (pickles can run code when loaded)",
            hint="convert it to safetensors, or pass --allow-pickle to scan and load it",
        )
    for f in pickles:
        bad = scan_pickle(f)
        if bad:
            raise SecurityError(
                f"refusing {f}: it imports {', '.join(bad[:5])}",
                hint="only plain tensor state dicts are allowed",
            )
    return pickles
