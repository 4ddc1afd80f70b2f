"""LoRA folded for generation without a second copy of the targeted weights on the device, and the training
weights back bit for bit (where (W + Δ) − Δ is not W)."""

from __future__ import annotations

import json

import pytest
import torch

from dschat_hal.models.lora import LoRALinear
from dschat_hal.models.lora_fold import fold_exactly, unfold_exactly


def lora_layer(dtype: torch.dtype, relative_delta: float, seed: int = 0) -> LoRALinear:
    """A 256x256 LoRA layer whose update is about `relative_delta` of its weight."""
    torch.manual_seed(seed)
    layer = LoRALinear(torch.nn.Linear(256, 256).to(dtype), dim=8)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_left_weight, std=1.0)
        layer.lora_left_weight.mul_(relative_delta * layer.weight.float().std() / layer.delta().float().std())
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relative_delta", [1e-3, 0.1, 3.0])
def test_fold_then_unfold_restores_the_weight_bit_for_bit(dtype, relative_delta):
    layer = lora_layer(dtype, relative_delta)
    original = layer.weight.detach().clone()
    delta = layer.delta().to(dtype)
    assert not torch.equal((original + delta) - delta, original)  # the naive unfold would not restore it
    x = torch.randn(4, 256).to(dtype)
    unfused = layer(x)
    folded = fold_exactly(layer)
    assert layer.fused and torch.equal(layer.weight, original + delta)  # the same fold as LoRALinear.fuse
    torch.testing.assert_close(layer(x), unfused, rtol=0.05, atol=0.05)
    weight_bytes = original.numel() * original.element_size()
    assert folded.values.device == torch.device("cpu") and folded.nbytes <= weight_bytes  # on the host
    if relative_delta <= 0.1:  # a trained update: only a fraction of the elements is kept
        assert folded.index is not None and folded.nbytes <= weight_bytes // 2
    unfold_exactly(folded)
    assert not layer.fused and torch.equal(layer.weight, original)


def test_generation_with_lora_folded_does_not_copy_the_targeted_weights():
    """A generation phase's peak resident memory (the CPU's device memory) stays far below the LoRA-targeted
    weights' size, where cloning them (the old restore) adds all of it. glibc is told to return freed
    blocks at once (MALLOC_MMAP_THRESHOLD_), so the resident set follows live allocations."""
    from conftest import run_script

    result = run_script("tests/workers/lora_fold_memory.py", env={"MALLOC_MMAP_THRESHOLD_": str(2**20)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    targeted = measured["targeted_bytes"]
    assert measured["clone_growth"] > 0.9 * targeted  # the yardstick: a copy of those weights is seen
    assert measured["phase_growth"] < targeted / 4, measured
    assert measured["restored"] and measured["unfused"]
