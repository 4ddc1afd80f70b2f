"""The CPU's fused AdamW: the same update as single-tensor AdamW, alone and inside DeepSpeed engines."""

from __future__ import annotations

import pytest
import torch

import accel
from accel.cpu import FusedAdamW
from dschat_hal.configs import HardwareConfig, LoggingConfig, OptimConfig, ScheduleConfig
from dschat_hal.models import create_lm, load_tokenizer
from dschat_hal.runtime import engine_from_config


def _param_groups(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    decayed = [
        torch.nn.Parameter(torch.randn(33, 17, generator=gen)),
        torch.nn.Parameter(torch.randn(5, generator=gen)),
    ]
    plain = [torch.nn.Parameter(torch.randn(64, generator=gen))]
    return [{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_cpu_adamw_steps_equal_single_tensor_adamw(device):
    """The CPU's default, and the CUDA backend's (the same class; its choice and update maths checked here on
    CPU tensors, the backend built without touching CUDA)."""
    from accel.cuda import CudaAccelerator

    backend = accel.get("cpu") if device == "cpu" else CudaAccelerator(local_rank=0)
    fused_groups, plain_groups = _param_groups(0), _param_groups(0)
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    fused = backend.optimizer_class()(fused_groups, **settings)
    plain = torch.optim.AdamW(plain_groups, foreach=False, **settings)
    assert isinstance(fused, FusedAdamW) and fused.defaults["fused"] is True
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        for group_f, group_p in zip(fused.param_groups, plain.param_groups, strict=True):
            group_f["lr"] = group_p["lr"] = 1e-2 / (step + 1)  # a schedule changes lr between steps
            for pf, pp in zip(group_f["params"], group_p["params"], strict=True):
                pf.grad = torch.randn(pf.shape, generator=gen)
                pp.grad = pf.grad.clone()
        fused.step()
        plain.step()
    for group_f, group_p, group_0 in zip(fused_groups, plain_groups, _param_groups(0), strict=True):
        for pf, pp, p0 in zip(group_f["params"], group_p["params"], group_0["params"], strict=True):
            assert (pf - p0).abs().max() > 1e-3  # the steps moved every tensor
            torch.testing.assert_close(pf, pp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_engine_with_fused_cpu_adamw_trains_like_plain_adamw(stage):
    backend = accel.get("cpu")
    backend.init_distributed()
    tokenizer = load_tokenizer("tiny-opt")
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    weights = []
    for fused in (True, False):
        backend.manual_seed(0)
        engine = engine_from_config(
            backend, create_lm("tiny-opt", tokenizer),
            OptimConfig(learning_rate=1e-2, weight_decay=0.1, lora_learning_rate=1e-3, zero_stage=stage),
            ScheduleConfig(lr_scheduler_type="constant"), HardwareConfig(no_fused_kernels=not fused), LoggingConfig(),
            dtype=torch.float32, total_steps=3, micro_batch=2, job_name="train",
        )  # fmt: skip
        assert isinstance(engine.basic_optimizer, FusedAdamW) is fused
        for _ in range(3):
            engine.backward(backend.lm_loss(engine(input_ids=ids).logits, ids, fp32=True))
            engine.step()
        weights.append(engine.optimizer.single_partition_of_fp32_groups[0].clone() if stage == 2
                       else engine.optimizer.fp32_partitioned_groups_flat[0].clone())  # fmt: skip
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
