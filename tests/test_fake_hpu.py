"""The HPU backend's decisions, exercised on the CPU through the recording fake of habana_frameworks."""

from __future__ import annotations

import os

import torch

import accel


def test_hpu_backend_answers(fake_hpu):
    hpu = accel.get("hpu")
    assert hpu.name == "hpu" and hpu.simulated
    assert hpu.dist_backend == "hccl"
    assert hpu.default_dtype == torch.bfloat16
    assert hpu.compute_fp32_loss("bloom") is True
    assert hpu.compute_fp32_loss("llama") is True
    assert hpu.compute_fp32_loss("opt") is False
    assert hpu.compute_fp32_loss("bloom", user_flag=False) is False
    assert hpu.wants_static_shapes
    assert hpu.bucket_length(10, maximum=64) == 64  # static: always the configured maximum
    assert hpu.zero_overrides(2) == {"overlap_comm": False, "reduce_scatter": False}
    assert hpu.zero_overrides(1)["contiguous_gradients"] is False
    assert hpu.device_count() == 1
    assert not hpu.supports_quantized_weights
    assert os.environ["PT_HPU_LAZY_MODE"] == "1"


def test_mark_step_is_recorded(fake_hpu):
    hpu = accel.get("hpu")
    for _ in range(3):
        hpu.mark_step()
    assert fake_hpu.core.calls == ["mark_step"] * 3


def test_fused_adamw_is_chosen_and_used(fake_hpu):
    hpu = accel.get("hpu")
    cls = hpu.optimizer_class()
    assert cls is fake_hpu.hpex.optimizers.FusedAdamW
    model = torch.nn.Linear(3, 1)
    optimizer = cls(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.weight)
    assert fake_hpu.hpex.optimizers.instances == [optimizer]
    assert hpu.optimizer_class(fused=False) is torch.optim.AdamW


def test_hpu_graph_capture_replaces_the_forward_for_good(fake_hpu):
    hpu = accel.get("hpu")
    hpu.use_graphs = True
    model = torch.nn.Linear(2, 2)
    plain_forward = model.forward
    assert hpu.capture_decode_step(model) is model
    assert fake_hpu.hpu.graph_wrapped == [model]
    assert model.forward != plain_forward  # as the real wrap_in_hpu_graph: every later call goes through it
    with torch.no_grad():
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    assert [r["replay"] for r in fake_hpu.hpu.graph_replays] == [False, True]
    hpu.use_graphs = False
    other = torch.nn.Linear(2, 2)
    assert hpu.capture_decode_step(other) is other and fake_hpu.hpu.graph_wrapped == [model]


def test_generation_context_flushes_before_and_after(fake_hpu):
    hpu = accel.get("hpu")
    with hpu.generation_context(torch.nn.Linear(1, 1)):
        assert fake_hpu.core.calls == ["mark_step"]
    assert fake_hpu.core.calls == ["mark_step", "mark_step"]


def test_every_rank_places_on_hpu_without_an_index(fake_hpu):
    """The bridge binds a process to its card from the launcher's environment; DeepSpeed, accelerate and
    optimum-habana place on plain "hpu" (optimum-habana dropped "hpu:X" as not fully supported)."""
    hpu = accel.get("hpu", local_rank=3)
    hpu.simulated = False  # the placement a real Gaudi process gets
    assert hpu.device == torch.device("hpu") and hpu.device.index is None
