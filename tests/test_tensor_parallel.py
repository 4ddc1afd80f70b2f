"""Tensor-parallel generation (`--inference_tp_size`): 2 processes under torchrun generate the tokens of
the whole-model engine and of HF `generate`, each holding half of the sharded weights; families AutoTP
cannot shard fall back to T = 1; sizes that cannot form groups are refused with one line."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import run_script
from test_hybrid_engine import EOS, PAD, answers_equal, engine_for, peaked_model, prompt_batch, reference_tokens
from transformers import LlamaConfig

from dschat_hal.args import check_tp_size
from dschat_hal.errors import UserError
from dschat_hal.rlhf.generation import make_hybrid_engine
from dschat_hal.rlhf.generation.engine import HybridEngine
from dschat_hal.rlhf.generation.sampling import GenerationConfig
from dschat_hal.rlhf.generation.tensor_parallel import TensorParallelEngine


def test_tp2_tokens_equal_the_whole_model_engine_and_hf_generate(tmp_path, monkeypatch):
    """opt, bloom, llama (grouped-query attention), gpt-neox under ZeRO-2 and ZeRO-3, LoRA on and off,
    uneven prompt counts per rank; launched by torchrun without LOCAL_SIZE (accel sets it)."""
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    result = run_script(
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"),
        "tests/workers/tp_generation.py",
        str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["local_size_at_start"] is None
        assert rank["shm_op"] and not rank["shm_buffer_left"]  # nothing left in /dev/shm, the all-reduce works
        assert len(rank["cases"]) == 8
        for name, case in rank["cases"].items():
            assert case["is_tp"], name
            assert case["equal_whole"] and case["equal_hf"] and case["second_phase_equal"], name
            assert case["sharded_bytes"] * 2 == case["sharded_full_bytes"], name  # AutoTP's cut: exactly half
            replicated = case["full_layer_bytes"] - case["sharded_full_bytes"]  # norms, row-parallel biases
            assert case["layer_bytes"] == case["sharded_bytes"] + replicated, name
            assert case["copy_bytes"] < 0.6 * case["full_bytes"], name
            # the group decodes both ranks' rows (rank 0 has the most and longest) on half of the key/value
            # heads: each rank's cache is rank 0's T = 1 cache
            assert case["cache_bytes"] == ranks[0]["cases"][name]["whole_cache_bytes"] > 0, name
            assert case["gather_calls"] == (2 if "zero3" in name else 0), name  # once per phase, all at once
            # a tied head stays tied: one vocabulary shard per rank (AutoTP's inference path unties it)
            assert case["head_shares_embedding"] == name.startswith(("opt", "bloom")), name
        assert rank["grouped"] == {"equal_hf": True, "gather_calls": 3}  # layer 0, layer 1, the rest
        assert rank["sampling_reproduces"] and rank["weights_changed"] and rank["tokens_changed"]
    assert ranks[0]["cases"]["llama-zero3-lora"]["copy_bytes"] == ranks[1]["cases"]["llama-zero3-lora"]["copy_bytes"]


@pytest.mark.parametrize(
    "family, reason",
    [
        ("gpt2", "DeepSpeed's AutoTP does not support GPT2LMHeadModel"),
        ("llama-3kv", "LlamaForCausalLM has 3 key/value heads, not a multiple of 2"),
    ],
)
def test_a_model_autotp_cannot_shard_falls_back_to_one_rank(family, reason, caplog):
    if family == "llama-3kv":
        from transformers import AutoModelForCausalLM

        config = LlamaConfig(
            vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = peaked_model(family, lora=False)
    prompts, mask = prompt_batch()
    config = GenerationConfig(max_answer_seq_len=4, pad_token_id=PAD, eos_token_id=EOS, do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    backend, engine = engine_for(model, 0)
    with caplog.at_level(logging.INFO, logger="dschat_hal.rlhf.generation.tensor_parallel"):
        hybrid = make_hybrid_engine(engine, backend, config, inference_tp_size=2, dtype=torch.float32)
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert lines == [f"hybrid engine: --inference_tp_size 2 falls back to 1: {reason}"]
    assert type(hybrid) is HybridEngine and not isinstance(hybrid, TensorParallelEngine)
    assert answers_equal(hybrid.generate(prompts, mask), reference)


@pytest.mark.parametrize(
    "tp, world, limit, hybrid, message",
    [
        (2, 3, 8, True, "--inference_tp_size 2 must divide the number of ranks (3)"),
        (4, 8, 2, True, "--inference_tp_size 4 is more than the 2 device(s) of one node"),
        (2, 2, 2, False, "--inference_tp_size 2 shards the hybrid engine's generation: add --enable_hybrid_engine"),
    ],
)
def test_tp_sizes_that_cannot_form_groups_are_refused(tp, world, limit, hybrid, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tp_size(tp, world, limit, hybrid)
    check_tp_size(1, world, limit, hybrid)
    check_tp_size(2, 4, 2, True)


@pytest.mark.parametrize("launcher", ["torchrun", "e2e-deepspeed"])
def test_step3_generates_tensor_parallel_under_both_launchers(e2e_output, tmp_path, monkeypatch, launcher):
    """--enable_hybrid_engine --inference_tp_size 2 on 2 CPU processes: step 3 under torchrun (ZeRO-3, two
    PPO steps: the form is refilled after training), and e2e's step 3 through DeepSpeed's launcher
    (--deployment-type single_node, ZeRO-2, one step). Both ranks log their TP group and copy; torchrun sets no
    LOCAL_SIZE, DeepSpeed's launcher does."""
    import sys

    from conftest import ROOT
    from test_step3_matrix import step3_args

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    env = {"DS_ACCELERATOR": "cpu", "PATH": f"{sys.prefix}/bin:/usr/bin:/bin"}
    if launcher == "torchrun":
        result = run_script(
            *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29633"),
            str(ROOT / "training/step3_rlhf_finetuning/main.py"),
            *step3_args(e2e_output, tmp_path, 3, False, False),
            *("--enable_hybrid_engine", "--inference_tp_size", "2"),
            env=env,
            timeout=600,
        )
        expected = "step 2 reward"
    else:
        for name in ("actor", "reward"):
            (tmp_path / name).symlink_to(e2e_output / name)
        result = run_script(
            "training/e2e_rlhf.py",
            *("--step", "3", "--deployment-type", "single_node", "--num-devices", "2", "--enable-hybrid-engine"),
            *(
                "--output-dir",
                str(tmp_path),
                "--step3-args",
                "--enable_test_mode --test_stop_step 1 --inference_tp_size 2",
            ),
            env=env,
            timeout=600,
        )
        expected = "deepspeed.launcher.runner --num_gpus 2"
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert expected in result.stdout
    for rank in (0, 1):
        assert f"hybrid engine: rank {rank}, TP group [0, 1] (index {rank} of 2): tensor-parallel copy" in output


def test_cpu_shm_all_reduce_is_kept_only_for_a_group_of_the_whole_world(monkeypatch):
    """DeepSpeed's CPU shm all-reduce sums over every local rank whatever group it is given: a TP group
    smaller than the world must fall back to the process group's all-reduce."""
    import types

    import deepspeed.comm.comm as ds_comm

    import accel

    backend = accel.get("cpu")
    monkeypatch.setattr(ds_comm, "cdb", types.SimpleNamespace(shm_vector_kernel_level=2))
    backend.prepare_tensor_parallel(2, 2)
    assert ds_comm.cdb.shm_vector_kernel_level == 2
    backend.prepare_tensor_parallel(2, 4)
    assert ds_comm.cdb.shm_vector_kernel_level == 0


def test_cpu_tensor_parallel_limit_is_the_processes_of_the_node(monkeypatch):
    import accel

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert accel.get("cpu").tensor_parallel_limit() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert accel.get("cpu").tensor_parallel_limit() == 1
