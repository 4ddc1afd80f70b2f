"""The HPU code paths, proven on the CPU with the recording fake of habana_frameworks:
static shapes (an audit of every input shape), mark_step placement (exact counts), and
padding that does not change the maths (same losses as the CPU run)."""

from __future__ import annotations

import math

import pytest
from conftest import import_fake_hpu, tiny_step3_argv

from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3


def sft_args(tmp_path, device, *extra):
    return [
        "--device",
        device,
        "--data_output_path",
        str(tmp_path / "cache"),
        "--max_seq_len",
        "64",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--audit_shapes",
        "--print_loss",
        "--dropout",
        "0.0",
        "--dtype",
        "fp32",
        *extra,
    ]


def step3_args(tmp_path, device, e2e_output, *extra):
    return [
        *tiny_step3_argv(e2e_output, tmp_path, device, prompt=32, answer=8, batch=4),
        "--audit_shapes",
        "--enable_test_mode",
        "--test_stop_step",
        "4",
        "--dtype",
        "fp32",
        *extra,
    ]


def test_step1_and_2_shapes_are_static_on_hpu_and_not_on_cpu(tmp_path, fake_hpu):
    cpu = step1(sft_args(tmp_path, "cpu", "--max_steps", "6"))["shape_counts"]
    hpu = step1(sft_args(tmp_path, "hpu", "--max_steps", "6"))["shape_counts"]
    assert cpu["actor"] > 1  # prompts of many lengths: dynamic padding makes many shapes
    assert hpu["actor"] == 1  # padded to --max_seq_len
    bucketed = step1(sft_args(tmp_path, "hpu", "--max_steps", "6", "--bucket_lengths", "32", "48", "64"))
    assert bucketed["shape_counts"]["actor"] <= 3
    rm_cpu = step2(sft_args(tmp_path, "cpu", "--max_steps", "6"))["shape_counts"]
    rm_hpu = step2(sft_args(tmp_path, "hpu", "--max_steps", "6"))["shape_counts"]
    assert rm_cpu["reward"] > 1 and rm_hpu["reward"] == 1


def test_step3_shapes_are_static_on_hpu(tmp_path, fake_hpu, e2e_output):
    cpu = step3(step3_args(tmp_path / "cpu", "cpu", e2e_output))["shape_counts"]
    hpu = step3(step3_args(tmp_path / "hpu", "hpu", e2e_output))["shape_counts"]
    assert max(cpu.values()) > 1
    assert set(hpu) == {"actor", "ref", "critic", "reward", "actor_train"}
    assert all(count == 1 for count in hpu.values()), hpu


def test_mark_step_counts_per_training_step(tmp_path, fake_hpu):
    result = step1(sft_args(tmp_path, "hpu", "--max_steps", "5"))
    eval_batches = 1  # 10 eval rows, batch 8, partial batch dropped for static shapes
    train_steps = len(result["losses"])
    assert train_steps == 5
    # after backward and after step for each training step; one per eval batch, before and after training
    assert len(fake_hpu.core.calls) == 2 * train_steps + 2 * eval_batches


def test_mark_step_counts_per_ppo_step(tmp_path, fake_hpu, e2e_output):
    steps = len(step3(step3_args(tmp_path, "hpu", e2e_output))["history"])
    # generation context: 2; experience: around 4 forwards = 5; actor and critic backward+step: 4
    assert len(fake_hpu.core.calls) == steps * (2 + 5 + 4)


def test_padding_does_not_change_the_losses(tmp_path, fake_hpu):
    cpu = step1(sft_args(tmp_path / "a", "cpu", "--max_steps", "8", "--seed", "2"))["losses"]
    hpu = step1(sft_args(tmp_path / "b", "hpu", "--max_steps", "8", "--seed", "2"))["losses"]
    assert len(cpu) == len(hpu) == 8
    assert hpu == pytest.approx(cpu, rel=1e-4)
    assert all(math.isfinite(x) for x in hpu)


def test_hpu_graphs_capture_only_the_decode_step(tmp_path, fake_hpu, e2e_output):
    """The fake replaces a wrapped module's forward for good, as the real `wrap_in_hpu_graph` does: a
    training forward through a captured graph would show up as a replay with autograd on."""
    flags = ("--enable_hybrid_engine", "--enable_hpu_graphs", "--test_stop_step", "2")
    result = step3(step3_args(tmp_path, "hpu", e2e_output, *flags))
    assert len(result["history"]) == 2
    assert [type(m).__name__ for m in fake_hpu.hpu.graph_wrapped] == ["DecodeStep"]  # once, reused
    replays = fake_hpu.hpu.graph_replays
    assert sum(r["replay"] for r in replays) > 2  # later tokens and steps replay the captured step
    assert not any(r["grad_enabled"] for r in replays)
    fake_hpu.hpu.reset()
    step3(step3_args(tmp_path / "plain", "hpu", e2e_output, "--enable_hpu_graphs", "--test_stop_step", "1"))
    assert fake_hpu.hpu.graph_wrapped == []  # plain generate never captures the training module


def test_eager_mode_compiles_with_the_hpu_backend_and_skips_mark_step(tmp_path, fake_hpu, monkeypatch):
    lazy = step1(sft_args(tmp_path / "lazy", "hpu", "--max_steps", "3", "--seed", "4"))["losses"]
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    assert fake_hpu.utils.internal.is_lazy()  # the bridge keeps the mode it was imported in
    fake_hpu = import_fake_hpu()  # a process started with PT_HPU_LAZY_MODE=0
    eager = step1(sft_args(tmp_path / "eager", "hpu", "--max_steps", "3", "--seed", "4"))["losses"]
    assert fake_hpu.dynamo.compiled_graphs, "the model forward went through torch.compile(backend='hpu_backend')"
    assert fake_hpu.core.calls == []  # mark_step is a lazy-mode concept
    assert eager == pytest.approx(lazy, rel=1e-4)
