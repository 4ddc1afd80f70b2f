"""ZeRO 1-2 step one optimizer group at a time; large groups are split (`ds_config.split_for_step`) so the
step's flat fp32 gradient copy is a quarter of the model's. The update stays the same; the memory saved is
measured in benchmarks/RESULTS_memory.md, and the memory plan counts the copy per group."""

from __future__ import annotations

import pytest
import torch
from conftest import train_engine

import accel
from dschat_hal import ds_config
from dschat_hal.memory_plan.estimates import optimizer_step_bytes, training_states
from dschat_hal.models import create_lm, load_tokenizer


def test_large_groups_split_in_consecutive_chunks_with_their_settings():
    sizes = [40, 10, 30, 20, 5, 45, 50]  # 200 elements
    big = {"params": [torch.nn.Parameter(torch.zeros(n)) for n in sizes], "weight_decay": 0.1}
    small = {"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}
    split = ds_config.split_for_step([big, small], parts=4, min_elements=100)
    assert split[-1] is small  # at or under min_elements: whole
    chunks = split[:-1]
    assert 2 <= len(chunks) <= 4 and all(chunk["weight_decay"] == 0.1 for chunk in chunks)
    assert [p for chunk in chunks for p in chunk["params"]] == big["params"]  # every parameter once, in order
    assert max(sum(p.numel() for p in chunk["params"]) for chunk in chunks) < 200 / 2


def _engine(backend, stage: int = 2):
    model = create_lm("tiny-opt", load_tokenizer("tiny-opt"))
    return train_engine(backend, model, stage, lr=1e-2, weight_decay=0.1, total_steps=3, micro_batch=2)


@pytest.mark.parametrize("stage", [1, 2])
def test_split_groups_train_exactly_like_whole_groups(stage, monkeypatch):
    """Same weights, bit for bit, after three steps with the tiny model's groups whole and split (threshold
    lowered). The loss is scaled so that gradient clipping stays off: DeepSpeed sums the norm group by group,
    and a clip coefficient that differs in its last bit is amplified by Adam where gradients are noise."""
    backend = accel.get("cpu")
    backend.init_distributed()
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    runs = []
    for min_elements in (10**12, 1000):
        monkeypatch.setattr(ds_config, "STEP_CHUNK_MIN_ELEMENTS", min_elements)
        backend.manual_seed(0)
        engine = _engine(backend, stage)
        for _ in range(3):
            engine.backward(1e-3 * backend.lm_loss(engine(input_ids=ids).logits, ids, fp32=True))
            engine.step()
            assert engine.get_global_grad_norm() < 1.0  # under --gradient_clipping 1.0
        groups = len(engine.basic_optimizer.param_groups)
        runs.append((groups, {name: p.detach().clone() for name, p in engine.module.named_parameters()}))
    (whole_groups, whole), (split_groups, split) = runs
    assert split_groups > whole_groups  # the tiny model's decayed group was split
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=0, msg=name)


def test_the_plan_counts_the_fp32_gradient_copy_of_one_chunk_on_the_cpu():
    """ZeRO-2 in bf16 on the CPU: 6 bytes per parameter of the largest chunk in the step, none between steps;
    ZeRO 0 keeps its measured 8 bytes per parameter; devices keep the whole fp32 partition in the states."""
    params = 200_000_000
    chunk = params / ds_config.STEP_CHUNKS
    assert optimizer_step_bytes(2, params, 1, "cpu", 2, offload=False) == 6 * chunk
    assert optimizer_step_bytes(2, params, 1, "cpu", 4, offload=False) == 4 * chunk  # fp32: the flat copy only
    assert optimizer_step_bytes(0, params, 1, "cpu", 2, offload=False) == 8 * params
    embedding = params / 2  # split at parameter boundaries: the largest parameter stays in one chunk
    assert optimizer_step_bytes(2, params, 1, "cpu", 2, offload=False, largest_param=embedding) == 6 * embedding
    small = ds_config.STEP_CHUNK_MIN_ELEMENTS  # whole
    assert optimizer_step_bytes(2, small, 1, "cpu", 2, offload=False) == 6 * small
    cpu = training_states(params, 0, 0, 2, 1, 2, False, "cpu").device
    gpu = training_states(params, 0, 0, 2, 1, 2, False, "gpu").device
    assert gpu - cpu == 4 * params


def test_a_unit_with_other_optimizer_groups_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    """A unit written before the split (whole groups) cannot load into split groups: one line saying with which
    DSCHAT_HAL_STEP_CHUNKS it was written; resumed with that setting, it loads."""
    from dschat_hal.checkpoints import load_unit, read_manifest, save_unit
    from dschat_hal.errors import UserError

    backend = accel.get("cpu")
    backend.init_distributed()
    monkeypatch.setattr(ds_config, "STEP_CHUNK_MIN_ELEMENTS", 1000)
    monkeypatch.setenv(ds_config.STEP_CHUNKS_ENV, "1")
    unit = save_unit(tmp_path / "ckpt", 1, {"actor": _engine(backend)}, {}, {"run": 1})
    assert read_manifest(unit)["step_chunks"] == 1
    monkeypatch.delenv(ds_config.STEP_CHUNKS_ENV)
    with pytest.raises(UserError, match=r"written with DSCHAT_HAL_STEP_CHUNKS=1, this run uses 4\); resume with "):
        load_unit(tmp_path / "ckpt", {"actor": _engine(backend)}, {"run": 1})
    monkeypatch.setenv(ds_config.STEP_CHUNKS_ENV, "1")
    assert load_unit(tmp_path / "ckpt", {"actor": _engine(backend)}, {"run": 1}) is not None
    monkeypatch.setenv(ds_config.STEP_CHUNKS_ENV, "four")
    with pytest.raises(UserError, match="give a whole number >= 1"):
        _engine(backend)
