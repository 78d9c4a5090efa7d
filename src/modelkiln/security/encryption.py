"""Encryption at rest: AES-256-GCM weight files, decrypted only in memory.

``encrypt_path`` turns every weight file (``*.safetensors``, ``*.onnx``,
``*.onnx.data``) under a path into ``<file>.enc``: the magic ``KILNENC1``, a
96-bit random nonce, then the AES-GCM ciphertext and tag. The file's name is
the associated data, so swapping two encrypted files is detected like any other
tampering. The key file (32 random bytes, hex) must not live inside the
encrypted directory.

Loading decrypts into ``bytes`` and hands them to ``safetensors.torch.load`` or
``onnxruntime.InferenceSession`` directly (an ONNX graph's external-data files
as in-memory files): plaintext never touches the disk. A
wrong key or a changed byte fails the GCM tag check: a clear error, never
garbage weights.

Example:
    >>> generate_key_file("/secure/model.key")
    >>> encrypt_path("runs/x/train/model", "/secure/model.key", remove_plaintext=True)
    >>> state_dict = load_safetensors_encrypted("runs/x/train/model/model.safetensors.enc",
    ...                                         "/secure/model.key")
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from modelkiln.errors import ConfigError, SecurityError

MAGIC = b"KILNENC1"
SUFFIX = ".enc"
WEIGHT_PATTERNS = ("*.safetensors", "*.onnx", "*.onnx.data", "*.bin")
_NONCE = 12


def generate_key_file(path: str | Path) -> Path:
    """Write a new 256-bit key (hex) to ``path`` with mode 0600."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def read_key_file(path: str | Path) -> bytes:
    """The 32-byte key of a key file (hex text).

    Raises:
        ConfigError: missing file or not 64 hex characters.
    """
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read key file {path}: {exc}",
            hint="make one with: kiln encrypt --generate-key FILE",
        ) from None
    if len(key) != 32:
        raise ConfigError(
            f"key file {path} holds {len(key)} bytes, not 32",
            hint="make one with: kiln encrypt --generate-key FILE",
        )
    return key


def encrypt_bytes(data: bytes, key: bytes, name: str) -> bytes:
    """``MAGIC + nonce + AES-GCM(data)`` with ``name`` as associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(_NONCE)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def decrypt_bytes(blob: bytes, key: bytes, name: str) -> bytes:
    """The plaintext of :func:`encrypt_bytes`'s output.

    Raises:
        SecurityError: not an encrypted file, wrong key, or tampered ciphertext.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not blob.startswith(MAGIC):
        raise SecurityError(f"{name} is not a modelkiln encrypted file (no {MAGIC!r} header)")
    nonce = blob[len(MAGIC) : len(MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + _NONCE :], name.encode())
    except InvalidTag:
        raise SecurityError(
            f"cannot decrypt {name}: wrong key, or the file was changed after encryption",
            hint="pass the key file it was encrypted with (--decrypt-key-file)",
        ) from None


def _plain_name(path: Path) -> str:
    return path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name


def encrypt_path(
    path: str | Path, key_file: str | Path, remove_plaintext: bool = False
) -> list[Path]:
    """Encrypt the weight files of a directory (or one file); return the ``.enc`` paths."""
    path, key_path = Path(path).resolve(), Path(key_file).resolve()
    if path.is_dir() and key_path.is_relative_to(path):
        raise ConfigError(
            f"key file {key_file} is inside {path}", hint="keep the key away from the ciphertext"
        )
    key = read_key_file(key_path)
    files = (
        [path] if path.is_file() else sorted({f for p in WEIGHT_PATTERNS for f in path.rglob(p)})
    )
    if not files:
        raise ConfigError(f"no weight files under {path}", hint=f"expected {WEIGHT_PATTERNS}")
    out = []
    for f in files:
        target = f.with_name(f.name + SUFFIX)
        target.write_bytes(encrypt_bytes(f.read_bytes(), key, f.name))
        if remove_plaintext:
            f.unlink()
        out.append(target)
    return out


def decrypt_file(path: str | Path, key_file: str | Path) -> bytes:
    """The plaintext of one ``.enc`` file, in memory."""
    path = Path(path)
    return decrypt_bytes(path.read_bytes(), read_key_file(key_file), _plain_name(path))


def load_safetensors_encrypted(path: str | Path, key_file: str | Path) -> dict[str, Any]:
    """A state dict from an encrypted safetensors file, never written in plaintext."""
    from safetensors.torch import load

    return dict(load(decrypt_file(path, key_file)))


def onnx_session_encrypted(path: str | Path, key_file: str | Path, **kwargs: Any) -> Any:
    """An ONNX Runtime session over an encrypted ``model.onnx.enc`` (single-file graphs)."""
    import onnxruntime as ort

    return ort.InferenceSession(decrypt_file(path, key_file), **kwargs)


#: Encrypted graphs an ONNX variant directory may hold, served in this order: a causal LM's
#: KV-cache graph before its plain graph (an encoder variant has only ``model.onnx``).
GRAPH_ORDER = ("model_kv.onnx", "model.onnx")


def find_encrypted_graph(model_dir: str | Path) -> Path | None:
    """The ``*.onnx.enc`` graph of a directory to serve (see :data:`GRAPH_ORDER`), else its
    only ``*.onnx.enc``, else None."""
    model_dir = Path(model_dir)
    for name in GRAPH_ORDER:
        if (model_dir / (name + SUFFIX)).is_file():
            return model_dir / (name + SUFFIX)
    found = sorted(model_dir.glob("*.onnx" + SUFFIX))
    return found[0] if len(found) == 1 else None


def onnx_session_from_dir(
    model_dir: str | Path, key_file: str | Path, threads: int | None = None
) -> Any:
    """The CPU session of an encrypted ONNX variant directory, decrypted in memory only; None
    when the directory holds no encrypted graph.

    The graph's external-data files (``*.onnx.data.enc``) are decrypted into memory too and
    handed to ONNX Runtime by name (``add_external_initializers_from_files_in_memory``).

    Raises:
        SecurityError: a wrong key or a tampered file.
        ServingError: the decrypted graph does not load.
    """
    from modelkiln.errors import ServingError
    from modelkiln.onnxrt import cpu_session

    graph_file = find_encrypted_graph(model_dir)
    if graph_file is None:
        return None
    key = read_key_file(key_file)
    graph = decrypt_bytes(graph_file.read_bytes(), key, _plain_name(graph_file))
    external: dict[str, bytes] = {}
    for f in sorted(Path(model_dir).glob("*" + SUFFIX)):
        name = _plain_name(f)
        # A file the graph references has its name in the graph's bytes (protobuf keeps the
        # external-data location as plain UTF-8): checked without parsing the graph, so
        # serving needs no `onnx` package; a false match only costs memory.
        referenced = name.encode() in graph and not name.endswith((".onnx", ".safetensors"))
        if f != graph_file and referenced:
            external[name] = decrypt_bytes(f.read_bytes(), key, name)
    try:
        return cpu_session(graph, threads, external)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ServingError(
            f"cannot load the decrypted graph {graph_file}: {exc}",
            hint="encrypt the variant directory with kiln encrypt (graph and *.onnx.data)",
        ) from exc


def load_hf_model_encrypted(model_dir: str | Path, key_file: str | Path) -> Any:
    """A Hugging Face model from ``config.json`` + encrypted ``*.safetensors.enc`` shards.

    The shards are decrypted into memory and handed to ``from_pretrained`` as a state
    dict: the plaintext weights never touch the disk.

    Raises:
        ConfigError: no encrypted shards or no config.json in ``model_dir``.
        SecurityError: a wrong key or a tampered shard.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_dir = Path(model_dir)
    shards = sorted(model_dir.glob("*.safetensors" + SUFFIX))
    if not shards or not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"{model_dir} holds no config.json + *.safetensors.enc",
            hint="encrypt a save_pretrained directory with kiln encrypt",
        )
    state: dict[str, Any] = {}
    for shard in shards:
        state.update(load_safetensors_encrypted(shard, key_file))
    config = AutoConfig.from_pretrained(model_dir)  # nosec B615 (a local directory, never the Hub)
    archs = config.architectures or []
    auto = (
        AutoModelForCausalLM
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        else AutoModel
    )
    cls: Any = auto._model_mapping[type(config)]  # the concrete class: from_pretrained(None, ...)
    return cls.from_pretrained(None, config=config, state_dict=state).eval()
