"""The plain-PyTorch CNN path: fusion, channel pruning, static int8, distillation, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from modelkiln.errors import ArtifactError, ConfigError
from modelkiln.optimize.vision import (
    CnnOptimizeConfig,
    DigitsCNN,
    DigitsData,
    accuracy,
    distill,
    export_cnn_onnx,
    fuse_conv_bn,
    load_digits_split,
    load_module,
    optimize_cnn,
    prune_channels,
    quantize_cnn_static,
    save_module,
    train_classifier,
)
from modelkiln.optimize.vision.model import predict
from modelkiln.optimize.vision.onnx_int8 import ort_logits, ort_session
from modelkiln.optimize.vision.transforms import kd_loss


class Branchy(nn.Module):
    """A non-sequential CNN (fused through torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1) + 0.0)


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return load_digits_split(0.25, seed=0)


@pytest.fixture(scope="module")
def teacher(data: DigitsData) -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN([16, 32, 32])
    train_classifier(model, data, epochs=2, seed=0)
    return model


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so fusion / pruning must carry them."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.2)


def test_split_is_stratified_and_fixed(data: DigitsData) -> None:
    again = load_digits_split(0.25, seed=0)
    assert torch.equal(data.y_test, again.y_test)
    assert len(data.y_test) == 450 and len(data.y_train) == 1347
    counts = torch.bincount(data.y_test, minlength=10).float() / len(data.y_test)
    assert counts.min() > 0.09 and counts.max() < 0.11
    with pytest.raises(ConfigError, match="test_size"):
        load_digits_split(1.5)


def test_teacher_learns(teacher: DigitsCNN, data: DigitsData) -> None:
    assert accuracy(predict(teacher, data.x_test), data.y_test) > 0.9


def test_fusion_parity_and_checkpoint(teacher: DigitsCNN, data: DigitsData, tmp_path: Path) -> None:
    fused = fuse_conv_bn(teacher)
    assert isinstance(fused, DigitsCNN)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # input untouched
    ref = predict(teacher, data.x_test)
    torch.testing.assert_close(predict(fused, data.x_test), ref, atol=1e-4, rtol=1e-4)
    reloaded = load_module(save_module(fused, tmp_path / "fused"))
    assert json.loads((tmp_path / "fused/module.json").read_text())["kwargs"]["batch_norm"] is False
    torch.testing.assert_close(predict(reloaded, data.x_test), ref, atol=1e-4, rtol=1e-4)


def test_fusion_of_non_sequential_module_goes_through_fx(data: DigitsData) -> None:
    torch.manual_seed(0)
    model = Branchy()
    _randomize_bn(model)
    model.eval()
    fused = fuse_conv_bn(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = data.x_test[:32]
    torch.testing.assert_close(predict(fused, x), predict(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_pruned_shapes_and_forward(
    teacher: DigitsCNN, data: DigitsData, criterion: Literal["l1", "taylor"]
) -> None:
    batches = list(data.batches(64, seed=0))[:2]
    pruned, report = prune_channels(teacher, 0.5, criterion, batches)
    assert report.before == [16, 32, 32] and report.after == [8, 16, 16]
    convs = [m for m in pruned if isinstance(m, nn.Conv2d)]
    bns = [m for m in pruned if isinstance(m, nn.BatchNorm2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16), (16, 16)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [(8, 1), (16, 8), (16, 16)]
    assert [b.num_features for b in bns] == [8, 16, 16]
    assert [tuple(b.running_mean.shape) for b in bns] == [(8,), (16,), (16,)]  # type: ignore[union-attr]
    assert pruned[-1].in_features == 16 * 4 * 4
    assert report.params_after < report.params_before / 2
    assert predict(pruned, data.x_test[:5]).shape == (5, 10)
    # The pruned model checkpoints as a DigitsCNN of the new widths.
    assert pruned.init_kwargs()["channels"] == [8, 16, 16]
    assert len(teacher[0].weight) == 16  # the source is untouched


def test_pruning_dead_channels_is_exact(teacher: DigitsCNN, data: DigitsData) -> None:
    """Channels whose ReLU output is always 0 go first; removing them leaves logits equal.

    This pins every index mapping: BN features, the next conv's input channels and the
    linear layer's channel-major columns after Flatten.
    """
    model = DigitsCNN([8, 12, 10])
    model.load_state_dict(DigitsCNN([8, 12, 10]).state_dict())
    _randomize_bn(model)
    model.eval()
    dead = {0: [1, 5], 3: [0, 4, 7, 11], 7: [2, 3, 9]}  # conv index -> dead output channels
    with torch.no_grad():
        for i, chans in dead.items():
            conv, bn = model[i], model[i + 1]
            conv.weight[chans] = 0.0  # lowest L1
            bn.weight[chans] = 0.0
            bn.bias[chans] = -1.0  # BN output -1 -> ReLU 0
    pruned, report = prune_channels(model, 0.3, "l1")
    # 0.3 -> keep round(8*0.7)=6, round(12*0.7)=8, round(10*0.7)=7: drops 2, 4, 3 channels.
    assert report.after == [6, 8, 7]
    assert [
        sorted(set(range(n)) - set(k)) for n, k in zip([8, 12, 10], report.kept, strict=True)
    ] == [
        dead[0],
        dead[3],
        dead[7],
    ]
    x = data.x_test[:64]
    torch.testing.assert_close(predict(pruned, x), predict(model, x), atol=1e-5, rtol=1e-5)


def test_pruning_errors(teacher: DigitsCNN) -> None:
    with pytest.raises(ConfigError, match="ratio"):
        prune_channels(teacher, 1.0)
    with pytest.raises(ConfigError, match="nn.Sequential"):
        prune_channels(Branchy(), 0.5)
    with pytest.raises(ConfigError, match="training batches"):
        prune_channels(teacher, 0.5, "taylor", [])
    mixing = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten())
    with pytest.raises(ConfigError, match="groups"):
        prune_channels(mixing, 0.5)
    through = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Conv2d(4, 2, 1))
    with pytest.raises(ConfigError, match="LayerNorm"):
        prune_channels(through, 0.5)


def test_static_int8_runs_in_onnxruntime(
    teacher: DigitsCNN, data: DigitsData, tmp_path: Path
) -> None:
    import onnx

    fp32 = export_cnn_onnx(teacher, data.x_test, tmp_path / "fp32.onnx")
    calib = [x for x, _ in data.batches(64, seed=0)][:4]
    info = quantize_cnn_static(fp32, tmp_path / "int8.onnx", calib, reduce_range=True)
    assert info == {"calibration_images": 256, "reduce_range": True, "per_channel": True}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert (tmp_path / "int8.onnx").stat().st_size < 0.5 * fp32.stat().st_size
    ref = accuracy(predict(teacher, data.x_test), data.y_test)
    fp32_ort = accuracy(ort_logits(ort_session(fp32), data.x_test), data.y_test)
    int8 = accuracy(ort_logits(ort_session(tmp_path / "int8.onnx"), data.x_test), data.y_test)
    assert fp32_ort == pytest.approx(ref, abs=1e-6)
    assert int8 >= ref - 0.03
    with pytest.raises(ConfigError, match="calibration"):
        quantize_cnn_static(fp32, tmp_path / "none.onnx", [])


def test_distilled_student_trains(teacher: DigitsCNN, data: DigitsData) -> None:
    logits = predict(teacher, data.x_test[:16])
    labels = logits.argmax(1)
    assert float(kd_loss(logits, logits, labels, 4.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    student = DigitsCNN([8, 16, 16])
    before = accuracy(predict(student, data.x_test), data.y_test)
    losses = distill(teacher, student, data, epochs=2, temperature=4.0, alpha=0.7)
    after = accuracy(predict(student, data.x_test), data.y_test)
    assert losses[-1] < losses[0]
    assert after > 0.8 and after > before + 0.5
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in teacher.parameters()
    )


def test_checkpoint_round_trip(teacher: DigitsCNN, data: DigitsData, tmp_path: Path) -> None:
    path = save_module(teacher, tmp_path / "ckpt")
    meta = json.loads((path / "module.json").read_text())
    assert meta["class"] == "modelkiln.optimize.vision.model:DigitsCNN"
    assert meta["kwargs"]["channels"] == [16, 32, 32]
    loaded = load_module(path)
    assert isinstance(loaded, DigitsCNN) and not loaded.training
    assert torch.equal(predict(loaded, data.x_test), predict(teacher, data.x_test))


def test_checkpoint_torch_export_program(data: DigitsData, tmp_path: Path) -> None:
    model = DigitsCNN([4, 4, 4]).eval()
    program = torch.export.export(model, (data.x_test[:2],))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = load_module(tmp_path / "m.pt2")
    torch.testing.assert_close(loaded(data.x_test[:2]), model(data.x_test[:2]))
    assert predict(loaded, data.x_test[:2]).shape == (2, 10)  # eval flags settable
    onnx_path = export_cnn_onnx(loaded, data.x_test, tmp_path / "m.onnx")
    torch.testing.assert_close(
        torch.as_tensor(ort_logits(ort_session(onnx_path), data.x_test[:2])),
        model(data.x_test[:2]),
        atol=1e-5,
        rtol=1e-5,
    )


def _edit_meta(path: Path, **changes: object) -> None:
    meta = json.loads((path / "module.json").read_text())
    meta.update(changes)
    (path / "module.json").write_text(json.dumps(meta))


def test_checkpoint_errors(tmp_path: Path) -> None:
    model = DigitsCNN([4, 4, 4])
    path = save_module(model, tmp_path / "c")
    with pytest.raises(ArtifactError, match="no module checkpoint"):
        load_module(tmp_path / "missing")
    _edit_meta(path, **{"class": "modelkiln.no_such_module:Net"})
    with pytest.raises(ConfigError, match="cannot import 'modelkiln.no_such_module'"):
        load_module(path)
    _edit_meta(path, **{"class": "modelkiln.optimize.vision.model:NoSuchNet"})
    with pytest.raises(ConfigError, match="no attribute 'NoSuchNet'"):
        load_module(path)
    _edit_meta(path, **{"class": "modelkiln.optimize.vision.model:DigitsData"})
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        load_module(path)
    _edit_meta(path, **{"class": "DigitsCNN"})
    with pytest.raises(ConfigError, match="package.module:ClassName"):
        load_module(path)
    _edit_meta(path, **{"class": "modelkiln.optimize.vision.model:DigitsCNN", "kwargs": {"w": 1}})
    with pytest.raises(ConfigError, match="rejects the kwargs"):
        load_module(path)
    _edit_meta(path, kwargs={"channels": [4, 8, 4]})
    with pytest.raises(ArtifactError, match="does not fit"):
        load_module(path)
    _edit_meta(path, format="something-else")
    with pytest.raises(ArtifactError, match="not a modelkiln-torch-module"):
        load_module(path)
    (path / "module.json").unlink()
    with pytest.raises(ArtifactError, match="no module.json"):
        load_module(path)


def test_unsafe_and_bare_pickles_are_refused(tmp_path: Path) -> None:
    model = DigitsCNN([4, 4, 4])
    torch.save(model, tmp_path / "whole.pt")  # a pickled module: code runs on load
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        load_module(tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ArtifactError, match="no architecture"):
        load_module(tmp_path / "state.pt")

    class Local(nn.Module):
        pass

    with pytest.raises(ConfigError, match="not importable"):
        save_module(Local(), tmp_path / "local")


def test_optimize_cnn_from_checkpoint(teacher: DigitsCNN, data: DigitsData, tmp_path: Path) -> None:
    ckpt = save_module(teacher, tmp_path / "teacher")
    cfg = CnnOptimizeConfig(
        kd_epochs=1, finetune_epochs=1, calibration_batches=2, timing_rounds=1, timing_calls=1
    )
    result = optimize_cnn(cfg, tmp_path / "out", checkpoint=ckpt)
    names = [r.name for r in result.rows]
    assert names == ["fp32", "fused", "pruned", "distilled", "onnx-fp32", "onnx-int8-static"]
    fp32 = result.row("fp32")
    assert fp32.accuracy == pytest.approx(accuracy(predict(teacher, data.x_test), data.y_test))
    assert result.row("fused").accuracy == fp32.accuracy
    assert (result.row("pruned").params or 0) < (fp32.params or 0)
    assert result.row("pruned").size_bytes < fp32.size_bytes / 2
    assert result.row("onnx-int8-static").accuracy >= fp32.accuracy - 0.03
    assert all(set(r.p50_ms) == {1, 64} and min(r.p50_ms.values()) > 0 for r in result.rows)
    table = (tmp_path / "out/comparison.md").read_text()
    assert table == result.table and "`onnx-int8-static`" in table
    saved = json.loads((tmp_path / "out/comparison.json").read_text())
    assert saved["details"]["pruned"]["widths_after"] == [8, 16, 16]
    assert isinstance(load_module(tmp_path / "out/variants/pruned"), DigitsCNN)

    wrong = save_module(DigitsCNN([4, 4, 4], num_classes=3), tmp_path / "three")
    with pytest.raises(ConfigError, match="expected"):
        optimize_cnn(cfg, tmp_path / "bad", checkpoint=wrong)
