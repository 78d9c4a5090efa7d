"""Every training method through one matrix: trains, loss goes down, saves, reloads with plain
transformers / peft to the same logits; mergeable adapters merge within the stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import train_helpers as h  # noqa: E402

from modelkiln.hardware import TOLERANCE  # noqa: E402
from modelkiln.train.api import MERGE_ATOL, merge, train  # noqa: E402

RELOAD_ATOL = 1e-5

METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "qlora": {"method": "qlora", "r": 4, "alpha": 8},
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 4, "tinit": 2, "tfinal": 2},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "ia3": {"method": "ia3"},
}
MERGEABLE = {"lora", "adalora", "ia3"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A briefly pretrained tiny base per architecture (finetune phase off)."""
    data, tok = h.shared_inputs()
    bases = {}
    for arch in ("llama", "gpt2"):
        cfg = h.tiny_config(
            architecture=arch,
            pretrain={"enabled": True, "max_steps": 12},
            finetune={"enabled": False},
        )
        art = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path_factory.mktemp(arch))
        bases[arch] = art.path / "model"
    return bases


def _load_base(path: str, method: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _reload(art: Path, method: str) -> Any:
    """The saved model, loaded with transformers (+ peft) only."""
    from peft import PeftModel

    layout = json.loads((art / "train.json").read_text())
    model_dir = art / layout["model"] if (art / layout["model"]).is_dir() else layout["model"]
    model = _load_base(str(model_dir), method)
    if layout["adapter"]:
        model = PeftModel.from_pretrained(model, str(art / layout["adapter"]))
    return model.eval()


def _bnb_4bit_layers(model: Any) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _check_bnb_default_path(reloaded: Any, expected: Any) -> None:
    """A plain load on an AVX512-BF16 CPU runs bitsandbytes' bf16 kernel: bf16's tolerance.

    bitsandbytes repacks a 4-bit layer on its first eval forward where the CPU has
    AVX512-BF16 and then computes it in bf16 whatever bnb_4bit_compute_dtype says.
    """
    got = _logits(reloaded)
    packed = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                 for m in _bnb_4bit_layers(reloaded))  # fmt: skip
    torch.testing.assert_close(got, expected, atol=TOLERANCE["bf16" if packed else "fp32"], rtol=0)


def _pin_bnb_fp32_path(model: Any) -> None:
    """Keep every 4-bit layer on the dequantize + fp32 matmul path (what training used)."""
    for m in _bnb_4bit_layers(model):
        m.support_avx512bf16_for_cpu = False


def _logits(model: Any) -> Any:
    model.eval()
    with torch.no_grad():
        return model(input_ids=h.probe_ids()).logits.float()


@pytest.mark.parametrize(
    ("arch", "method"),
    [("llama", m) for m in METHODS] + [("gpt2", "lora"), ("gpt2", "ia3")],
)
def test_method_trains_saves_reloads(
    arch: str, method: str, pretrained: dict[str, Path], tmp_path: Path
) -> None:
    data, tok = h.shared_inputs()
    lr = {"full": 2e-3, "prompt_tuning": 1e-1}.get(method, 1e-2)
    cfg = h.tiny_config(METHODS[method], source=str(pretrained[arch]),
                        finetune={"learning_rate": lr})  # fmt: skip
    capture = h.capture_callback()
    art = train(cfg, data=data, tokenizer=tok, run_dir=tmp_path, callbacks=[capture])

    m = art.metrics["finetune"]
    assert m["steps"] == 12 and m["method"] == method
    assert m["eval_loss_after"] < m["eval_loss_before"], m
    if method == "full":
        assert m["trainable_params"] == m["total_params"]
        assert not (art.path / "adapter").exists()
    else:
        assert 0 < m["trainable_params"] < m["total_params"] / 5
        assert (art.path / "adapter" / "adapter_model.safetensors").is_file()
    assert (art.path / "report.md").read_text().startswith("## Train")
    assert (art.path / "loss_curve.png").stat().st_size > 1000
    assert not list(art.path.rglob("*.bin")) and not list(art.path.rglob("*.pt"))

    expected = _logits(capture.model)
    reloaded = _reload(art.path, method)
    if method == "qlora":
        _check_bnb_default_path(reloaded, expected)
        # The repack rounded the block scales to bf16 for good: compare a fresh load, pinned
        # to the fp32 path the run trained and ran on (like with like).
        reloaded = _reload(art.path, method)
        _pin_bnb_fp32_path(reloaded)
    torch.testing.assert_close(_logits(reloaded), expected, atol=RELOAD_ATOL, rtol=0)

    if method in MERGEABLE:
        report = merge(art.path, tmp_path / "merged")
        assert report.max_abs_diff <= MERGE_ATOL and report.reload_max_abs_diff <= MERGE_ATOL
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        torch.testing.assert_close(_logits(merged), expected, atol=MERGE_ATOL, rtol=0)
