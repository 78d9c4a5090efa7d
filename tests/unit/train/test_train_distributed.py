"""Distributed training settings: batch split, launch values, Trainer arguments, DeepSpeed, FSDP.

The real 2-process DDP run is tests/integration/test_train_ddp.py; FSDP needs CUDA GPUs
(accelerate shards only multi-GPU runs) and is tested under the ``gpu`` marker here.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import train_helpers as h
from pydantic import ValidationError

from modelkiln.errors import ConfigError, DependencyMissingError
from modelkiln.train import distributed as tdist
from modelkiln.train.config import DistributedConfig, FinetuneConfig, TrainConfig
from modelkiln.train.launch import LaunchSpec, torchrun_command


@pytest.mark.parametrize(
    ("batch", "accum", "world", "expected"),
    [
        (4, 2, 2, (4, 1)),  # accumulation divided first
        (4, 1, 2, (2, 1)),  # then the micro-batch
        (4, 2, 4, (2, 1)),  # both
        (3, 4, 2, (3, 2)),
        (4, 2, 1, (4, 2)),  # one process: unchanged
    ],
)
def test_keep_global_batch_splits_the_configured_batch(
    batch: int, accum: int, world: int, expected: tuple[int, int]
) -> None:
    loop = tdist.scale_loop(
        FinetuneConfig(batch_size=batch, grad_accum=accum), DistributedConfig(), world
    )
    assert (loop.batch_size, loop.grad_accum) == expected
    assert loop.batch_size * loop.grad_accum * world == batch * accum


def test_unsplittable_batch_and_per_device_mode() -> None:
    with pytest.raises(ConfigError, match="over 2 processes") as err:
        tdist.scale_loop(FinetuneConfig(batch_size=3, grad_accum=1), DistributedConfig(), 2)
    assert "per_device" in (err.value.hint or "")
    per_device = DistributedConfig(batch="per_device")
    loop = tdist.scale_loop(FinetuneConfig(batch_size=3, grad_accum=1), per_device, 2)
    assert (loop.batch_size, loop.grad_accum) == (3, 1)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (LaunchSpec(nproc=0), "--nproc must be >= 1"),
        (LaunchSpec(nnodes=0), "--nnodes must be >= 1"),
        (LaunchSpec(nnodes=2, node_rank=2, master_addr="node0"), "--node-rank 2 is not in 0..1"),
        (LaunchSpec(node_rank=-1), "--node-rank -1"),
        (LaunchSpec(master_port=70000), "--master-port 70000"),
        (LaunchSpec(nnodes=2, node_rank=1), "cannot be reached from other nodes"),
    ],
)
def test_bad_launch_values_are_config_errors(spec: LaunchSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        spec.validate()


def test_torchrun_command() -> None:
    spec = LaunchSpec(nproc=2, nnodes=2, node_rank=1, master_addr="node0", master_port=29611)
    cmd = torchrun_command(spec, ["-m", "modelkiln.train.worker", "job.json"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for flag in ("--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--master-addr=node0",
                 "--master-port=29611"):  # fmt: skip
        assert flag in cmd
    assert cmd[-3:] == ["-m", "modelkiln.train.worker", "job.json"]
    assert spec.world_size == 4


def test_trainer_args_per_strategy() -> None:
    assert tdist.trainer_args(DistributedConfig(), 1, cuda=False) == {}
    ddp = tdist.trainer_args(DistributedConfig(), 2, cuda=False)
    assert ddp["ddp_backend"] == "gloo"
    assert tdist.trainer_args(DistributedConfig(), 2, cuda=True)["ddp_backend"] == "nccl"
    fsdp = tdist.trainer_args(DistributedConfig(strategy="fsdp"), 2, cuda=True)
    assert fsdp["fsdp"] is True
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    with pytest.raises(ConfigError, match="nccl backend needs CUDA"):
        tdist.trainer_args(DistributedConfig(backend="nccl"), 2, cuda=False)


def test_fsdp_on_cpu_is_refused_not_silently_ddp() -> None:
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs") as err:
        tdist.check_strategy(DistributedConfig(strategy="fsdp"), cuda=False)
    assert "ddp" in (err.value.hint or "")


def test_deepspeed_section_is_validated() -> None:
    with pytest.raises(ValidationError, match="offload_params needs ZeRO stage 3"):
        TrainConfig.model_validate(
            {"distributed": {"deepspeed": {"stage": 2, "offload_params": "cpu"}}}
        )
    with pytest.raises(ValidationError, match="nvme_path"):
        TrainConfig.model_validate({"distributed": {"deepspeed": {"offload_optimizer": "nvme"}}})
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"distributed": {"deepspeed": {"stage": 4}}})
    cfg = TrainConfig.model_validate(
        {"distributed": {"strategy": "deepspeed",
                         "deepspeed": {"stage": 3, "offload_optimizer": "cpu",
                                       "offload_params": "cpu"}}}
    )  # fmt: skip
    ds = tdist.deepspeed_config(cfg.distributed)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # complete saves
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled from the loop by Trainer
    json.dumps(ds)


def test_deepspeed_missing_names_the_distributed_extra(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    dist = DistributedConfig(strategy="deepspeed")
    with pytest.raises(DependencyMissingError, match="deepspeed") as err:
        tdist.trainer_args(dist, 2, cuda=False)
    assert err.value.extra == "distributed"
    assert "modelkiln[distributed]" in str(err.value)
    from modelkiln.train.api import DistributedTrainer

    trainer = DistributedTrainer(h.tiny_config(), nproc=2, strategy="deepspeed",
                                 output_dir=tmp_path / "ds")  # fmt: skip
    assert trainer.config.distributed.strategy == "deepspeed"
    with pytest.raises(DependencyMissingError, match="distributed"):  # before any launch
        trainer.train(data=tmp_path / "unused")
    assert not (tmp_path / "ds").exists()


def test_distributed_trainer_validates_and_overrides(tmp_path: Path) -> None:
    from modelkiln.train import DistributedTrainer

    with pytest.raises(ConfigError, match="--nproc must be >= 1"):
        DistributedTrainer(nproc=0)
    trainer = DistributedTrainer(
        h.tiny_config(), nproc=2, output_dir=tmp_path,
        overrides=["distributed.batch=per_device", "finetune.max_steps=3"],
    )  # fmt: skip
    assert trainer.config.distributed.batch == "per_device"
    assert trainer.config.finetune.max_steps == 3
    assert trainer.spec.world_size == 2
    with pytest.raises(ConfigError, match="DistributedTrainer"):
        DistributedTrainer(overrides=["distributed.strategy=horovod"])


def test_unsplittable_batch_fails_before_launching(tmp_path: Path) -> None:
    from modelkiln.train.launch import launch_train

    cfg = h.tiny_config(finetune={"batch_size": 3, "grad_accum": 1})
    with pytest.raises(ConfigError, match="over 2 processes"):
        launch_train(cfg, LaunchSpec(nproc=2), data=tmp_path, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--nproc", "0"], "--nproc must be >= 1"),
        (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "n0"],
         "--node-rank 2 is not in 0..1"),
        (["--nproc", "2", "--set", "train.distributed.strategy=deepspeed"],
         "'deepspeed' is not installed"),
    ],
)  # fmt: skip
def test_cli_rejects_bad_launch_values(args: list[str], match: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modelkiln.cli import app

    result = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not any(tmp_path.iterdir())  # nothing ran


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FSDP_SAVE = """
import sys
import torch, torch.distributed as dist
from pathlib import Path
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from modelkiln.train.distributed import full_weights

out = Path(sys.argv[1])
dist.init_process_group("gloo")
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj"]))
for n, p in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p)  # not all zeros, so a wrong shard would show
whole = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in model.base_model.model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
shard = dict(model.named_parameters())[next(iter(whole))]
assert isinstance(shard, DTensor) and shard.to_local().shape[0] == 2, shard.shape
with full_weights(model):  # every rank gathers, rank 0 saves
    if dist.get_rank() == 0:
        model.save_pretrained(out / "adapter")
        save_file(whole, str(out / "whole.safetensors"))
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_sharded_adapter_is_saved_whole(tmp_path: Path) -> None:
    """FSDP2 on CPU/gloo without Trainer: the save gathers the shards into whole weights."""
    pytest.importorskip("peft")
    import os
    import subprocess

    import torch
    from safetensors.torch import load_file

    script = tmp_path / "fsdp_save.py"
    script.write_text(FSDP_SAVE)
    spec = LaunchSpec(nproc=2, master_port=_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun_command(spec, [str(script), str(tmp_path)]), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    whole = load_file(str(tmp_path / "whole.safetensors"))
    assert len(saved) == len(whole) == 4  # lora_A and lora_B of q_proj in 2 layers
    for name, value in whole.items():
        key = name.replace(".default", "")
        assert saved[key].shape == value.shape  # (4, 64) / (64, 4), not (2, 64) shards
        assert torch.equal(saved[key], value), key


@pytest.mark.gpu
def test_fsdp_two_gpus_saves_a_complete_adapter(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("FSDP needs 2 CUDA GPUs")
    from safetensors.torch import load_file

    from modelkiln.train.api import load_trained
    from modelkiln.train.launch import launch_train

    data, tok = h.shared_inputs()
    cfg = h.tiny_config({"method": "lora", "r": 4, "alpha": 8},
                        finetune={"max_steps": 4, "eval_steps": 2, "save_steps": 2,
                                  "batch_size": 2, "grad_accum": 2},
                        distributed={"strategy": "fsdp"})  # fmt: skip
    art = launch_train(cfg, LaunchSpec(nproc=2, master_port=_free_port()), data=data,
                       tokenizer=tok, run_dir=tmp_path / "fsdp", resume=False)  # fmt: skip
    sd = load_file(str(art.path / "adapter" / "adapter_model.safetensors"))
    assert all(v.shape[0] == 4 for k, v in sd.items() if "lora_A" in k)  # whole, not shards
    model, _ = load_trained(art.path)
    assert type(model).__name__ == "PeftModelForCausalLM"
