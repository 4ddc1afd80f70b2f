"""DeepSpeed on the CPU in one process: a tiny model trains under ZeRO 0, 2 and 3 through accel."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_engine

import accel
from dschat_hal.models import create_lm, load_tokenizer


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_tiny_model_trains_three_steps(stage):
    backend = accel.get("cpu")
    backend.init_distributed()
    backend.manual_seed(0)
    model = create_lm("tiny-opt", load_tokenizer("tiny-opt"))
    engine = train_engine(backend, model, stage, lr=1e-2, dtype=torch.bfloat16, total_steps=3, micro_batch=2)
    assert engine.zero_optimization_stage() == stage
    ids = torch.randint(4, 200, (2, 16))
    losses = []
    for _ in range(3):
        loss = backend.lm_loss(engine(input_ids=ids).logits, ids, fp32=True)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
