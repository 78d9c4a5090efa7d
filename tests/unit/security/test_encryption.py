"""AES-GCM at rest: round trip in memory, wrong key, tampering, swapped files, key placement."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkiln.errors import ConfigError, SecurityError
from modelkiln.security.encryption import (
    decrypt_file,
    encrypt_path,
    generate_key_file,
    load_safetensors_encrypted,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return d


def test_round_trip_in_memory_and_plaintext_removed(model_dir: Path, tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    (enc,) = encrypt_path(model_dir, key, remove_plaintext=True)
    assert enc.name == "model.safetensors.enc" and not (model_dir / "model.safetensors").exists()
    assert b"\x00\x00\x80?" not in enc.read_bytes()  # 1.0f is not visible in the ciphertext
    state = load_safetensors_encrypted(enc, key)
    assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors.enc"]


def test_wrong_key_and_tampering_fail_cleanly(model_dir: Path, tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    other = generate_key_file(tmp_path / "other.key")
    (enc,) = encrypt_path(model_dir, key)
    with pytest.raises(SecurityError, match="wrong key, or the file was changed"):
        decrypt_file(enc, other)
    blob = bytearray(enc.read_bytes())
    blob[-40] ^= 1
    enc.write_bytes(bytes(blob))
    with pytest.raises(SecurityError, match="wrong key, or the file was changed"):
        decrypt_file(enc, key)


def test_renamed_ciphertext_is_detected(model_dir: Path, tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    (enc,) = encrypt_path(model_dir, key)
    moved = enc.rename(enc.with_name("other.safetensors.enc"))
    with pytest.raises(SecurityError):
        decrypt_file(moved, key)


def test_key_inside_the_model_dir_is_refused(model_dir: Path) -> None:
    key = generate_key_file(model_dir / "k.key")
    with pytest.raises(ConfigError, match="inside"):
        encrypt_path(model_dir, key)
    (model_dir / "bad.key").write_text("abcd")
    with pytest.raises(ConfigError, match="2 bytes, not 32"):
        encrypt_path(model_dir.parent / "model" / "model.safetensors", model_dir / "bad.key")


def test_onnx_session_from_encrypted_graph(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from modelkiln.security.encryption import onnx_session_encrypted

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    key = generate_key_file(tmp_path / "k.key")
    (enc,) = encrypt_path(tmp_path / "model.onnx", key, remove_plaintext=True)
    session = onnx_session_encrypted(enc, key, providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.array([1.0, -2.0], dtype=np.float32)})[0]
    assert out.tolist() == [-1.0, 2.0]


def _add_graph_with_external_data(root: Path) -> Path:
    """``model.onnx`` computing ``y = x + w`` with ``w`` in ``model.onnx.data``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(256, dtype=np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir()
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)  # fmt: skip
    return root


def test_onnx_variant_dir_with_external_data_decrypts_in_memory(tmp_path: Path) -> None:
    import numpy as np

    from modelkiln.security.encryption import onnx_session_from_dir

    pytest.importorskip("onnx")
    variant = _add_graph_with_external_data(tmp_path / "variant")
    key = generate_key_file(tmp_path / "k.key")
    assert onnx_session_from_dir(variant, key) is None  # plaintext: the server's own reader
    encrypt_path(variant, key, remove_plaintext=True)
    assert sorted(p.name for p in variant.iterdir()) == ["model.onnx.data.enc", "model.onnx.enc"]
    session = onnx_session_from_dir(variant, key, threads=1)
    out = session.run(None, {"x": np.ones(256, dtype=np.float32)})[0]
    assert out.tolist() == [i + 1.0 for i in range(256)]
    assert sorted(p.name for p in variant.iterdir()) == ["model.onnx.data.enc", "model.onnx.enc"]
    data = variant / "model.onnx.data.enc"
    blob = bytearray(data.read_bytes())
    blob[-3] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(SecurityError, match=r"cannot decrypt model.onnx.data: wrong key, or"):
        onnx_session_from_dir(variant, key)


def test_decrypt_key_file_plugs_an_onnx_loader_and_only_one_is_allowed(tmp_path: Path) -> None:
    from modelkiln.contract.serving import ServeHooks, merge_hooks
    from modelkiln.errors import ServingError
    from modelkiln.security.serving import SecurityPolicy

    hooks = SecurityPolicy(decrypt_key_file=generate_key_file(tmp_path / "k.key")).hooks()
    assert hooks.onnx_loader is not None and hooks.model_loader is not None
    assert hooks.onnx_loader(tmp_path, None) is None  # no encrypted graph: not ours
    assert merge_hooks(hooks, ServeHooks()).onnx_loader is hooks.onnx_loader
    with pytest.raises(ServingError, match="two extensions each plug in an ONNX session loader"):
        merge_hooks(hooks, ServeHooks(onnx_loader=lambda p, t: None))
