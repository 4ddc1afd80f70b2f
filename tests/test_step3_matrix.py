"""Step 3 as upstream's nightly ran it: ZeRO {2,3} x offload x LoRA, plus 2 processes under torchrun."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, tiny_step3_argv
from transformers import AutoModelForCausalLM

from dschat_hal.models import create_reward_model, load_tokenizer
from training.step3_rlhf_finetuning.main import main as step3


def step3_args(e2e_output, out, stage, offload, lora, steps=2):
    args = [
        *tiny_step3_argv(e2e_output, out),
        "--actor_zero_stage",
        str(stage),
        "--critic_zero_stage",
        str(stage),
        "--enable_test_mode",
        "--test_stop_step",
        str(steps),
        "--output_dir",
        str(out / "rlhf"),
    ]
    if offload:
        args += ["--offload", "--offload_reference_model"]
    if lora:
        args += [
            "--actor_lora_dim",
            "4",
            "--actor_lora_module_name",
            "decoder.layers.",
            "--critic_lora_dim",
            "4",
            "--critic_lora_module_name",
            "decoder.layers.",
            "--only_optimize_lora",
            "--actor_gradient_checkpointing",
        ]
    return args


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("offload", [False, True], ids=["no-offload", "offload"])
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_step3_matrix(e2e_output, tmp_path, stage, offload, lora):
    result = step3(step3_args(e2e_output, tmp_path, stage, offload, lora))
    assert len(result["history"]) == 2
    actor_dir, critic_dir = tmp_path / "rlhf" / "actor", tmp_path / "rlhf" / "critic"
    actor = AutoModelForCausalLM.from_pretrained(actor_dir)
    assert not any("lora" in name for name in actor.state_dict())  # LoRA fused before saving
    tokenizer = load_tokenizer(str(actor_dir))
    ids = tokenizer("Human: How do I cook rice? Assistant:", return_tensors="pt")["input_ids"]
    assert (
        actor.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id).shape[1]
        > ids.shape[1]
    )
    critic = create_reward_model(str(critic_dir), tokenizer)
    assert critic.forward_value(ids, ids.new_ones(ids.shape))["chosen_end_scores"].shape == (1,)


@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid-engine"])
def test_step3_with_two_processes_under_torchrun(e2e_output, tmp_path, hybrid):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29613" if hybrid else "29612",
        str(ROOT / "training/step3_rlhf_finetuning/main.py"),
        *step3_args(e2e_output, tmp_path, 3, False, False),
        *(["--enable_hybrid_engine"] if hybrid else []),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step 2 reward" in result.stdout
    assert (result.stdout + result.stderr).count("step 3: actor ready") == 1  # rank 0 logs, rank 1 does not
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor").config.model_type == "opt"


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_step3_with_the_hybrid_engine(e2e_output, tmp_path, stage):
    """LoRA and offload on: ZeRO-3 generates from the gathered copy, ZeRO-2 from the actor with LoRA folded."""
    args = [*step3_args(e2e_output, tmp_path, stage, offload=True, lora=True), "--enable_hybrid_engine"]
    history = step3(args)["history"]
    assert len(history) == 2 and all(h["answer_length"] > 0 for h in history)
    AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor")
