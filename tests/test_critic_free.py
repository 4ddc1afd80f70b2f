"""Critic-free step 3 (issue #29) end to end on tiny random models: no critic is built, planned,
checkpointed or saved; a run stopped by --max_steps resumes exactly (losses and actor weights);
e2e passes the estimator through to step 3. The estimators' maths: tests/test_advantages.py;
learning the toy task: tests/test_ppo_learns.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import save_tiny_rlhf_models
from test_resume_epochs import assert_same_weights, interrupted_then_resumed

from training.step3_rlhf_finetuning.main import main as step3

STEPS = 3  # prompt batches in the run below: 12 prompts, 4 per batch


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return save_tiny_rlhf_models(tmp_path_factory.mktemp("critic_free_models"))


def argv(models: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp / "cache"), "--seed", "9",
        "--data_split", "97,0,3", "--actor_model_name_or_path", str(models / "actor"),
        "--critic_model_name_or_path", str(models / "reward"), "--max_prompt_seq_len", "48",
        "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "4",
        "--per_device_training_batch_size", "4", "--actor_learning_rate", "5e-4", "--num_warmup_steps", "0",
        "--actor_dropout", "0.0", "--save_interval", "1", "--quiet", *extra,
    ]  # fmt: skip


ESTIMATORS = {
    # N = 2: 8 rows per step in 2 micro-batches, advantages computed before the first update
    "grpo": ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "2"],
    # ReMax: one greedy answer per prompt; one micro-batch, old log-probs from the training forward
    "remax": ["--advantage_estimator", "remax", "--enable_ema"],
    # REINFORCE++: batch-whitened over two PPO epochs
    "reinforce_pp": ["--advantage_estimator", "reinforce_pp", "--ppo_epochs", "2"],
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_critic_free_run_resumes_exactly_without_a_critic(estimator, models, tmp_path):
    flags = ESTIMATORS[estimator]
    full = step3([*argv(models, tmp_path, *flags), "--output_dir", str(tmp_path / "full")])
    assert len(full["history"]) == STEPS, "the data no longer gives the planned batches"
    assert "critic" not in full["optimizer_steps"] and "critic_loss" not in full["history"][0]
    assert not (tmp_path / "full" / "critic").exists() and (tmp_path / "full" / "actor").is_dir()

    resumed = interrupted_then_resumed(step3, argv(models, tmp_path, *flags), tmp_path / "run", 1)
    history = resumed["history"]
    assert len(history) == STEPS - 1
    for key in ("reward", "actor_loss", "kl", "advantage"):
        assert [r[key] for r in history] == pytest.approx([r[key] for r in full["history"][1:]], abs=1e-5), key
    assert_same_weights(tmp_path / "full", tmp_path / "run")
    units = sorted((tmp_path / "run_checkpoints").glob("global_step*"))
    assert units
    for unit in units:
        manifest = json.loads((unit / "manifest.json").read_text())
        assert "critic" not in manifest["engines"] and not (unit / "critic").exists()
        assert manifest["setup"]["advantage_estimator"] == estimator


def test_a_ppo_checkpoint_is_not_resumed_as_grpo(models, tmp_path, capsys):
    step3([*argv(models, tmp_path), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    grpo = ESTIMATORS["grpo"]
    with pytest.raises(SystemExit) as exit_info:
        step3([*argv(models, tmp_path, *grpo), "--output_dir", str(tmp_path / "run"), "--resume"])
    assert exit_info.value.code == 2
    assert "holds actor, critic but this run trains actor; resume with the same models and options (e.g. " in (
        capsys.readouterr().err
    )


def test_the_memory_plan_counts_no_critic(models, tmp_path):
    from dschat_hal import memory_plan
    from dschat_hal.args import step3_parser
    from dschat_hal.configs import Step3Config, to_config

    def plan(*flags: str) -> dict:
        args = step3_parser().parse_args(
            [*argv(models, tmp_path, *flags), "--device_memory", "40GiB", "--actor_zero_stage", "2"]
        )
        return memory_plan.summary(memory_plan.plan_for(to_config(args, Step3Config), 3))

    ppo, grpo = plan(), plan("--advantage_estimator", "grpo", "--n_samples_per_prompt", "2")
    assert "critic states" in ppo["phases"]["training"] and "critic states" not in grpo["phases"]["training"]
    assert grpo["phases"]["training"]["total"] < ppo["phases"]["training"]["total"]
    assert grpo["phases"]["generation"]["KV cache"] == 2 * ppo["phases"]["generation"]["KV cache"]  # prompts x N


def test_e2e_passes_the_estimator_to_step3(tmp_path):
    from training.e2e_rlhf import parse_args, step_command

    def step3_flags(*flags: str) -> list[str]:
        return step_command(3, parse_args(["--output-dir", str(tmp_path), *flags]), tmp_path)

    assert "--advantage_estimator" not in step3_flags()
    command = step3_flags("--advantage-estimator", "grpo")
    assert command[command.index("--advantage_estimator") + 1] == "grpo"
    assert command[command.index("--n_samples_per_prompt") + 1] == "4"
    command = step3_flags("--advantage-estimator", "remax", "--n-samples-per-prompt", "2")
    assert command[command.index("--n_samples_per_prompt") + 1] == "2"


# ---- loose ends of issue #29 -------------------------------------------------------------------
def test_e2e_passes_the_policy_loss_flags_to_step3(tmp_path):
    from training.e2e_rlhf import check_step_flags, parse_args, step_command

    def e2e_args(*flags: str):
        return parse_args(["--output-dir", str(tmp_path), *flags])

    flags = ["--advantage-estimator", "grpo", "--n-samples-per-prompt", "2", "--dr-grpo", "--kl-loss"]
    flags += ["--kl-estimator", "k2", "--kl-loss-coef", "0.01", "--log-rollout-mismatch", "--rollout-is-cap", "2"]
    args = e2e_args(*flags)
    command = step_command(3, args, tmp_path)
    for flag, value in (("--kl_estimator", "k2"), ("--kl_loss_coef", "0.01"), ("--rollout_is_cap", "2.0")):
        assert command[command.index(flag) + 1] == value, flag
    assert {"--dr_grpo", "--kl_loss", "--log_rollout_mismatch"} <= set(command)
    # no critic: none of the critic's defaults, which step 3 would note as unused
    assert not [word for word in command if word.startswith("--critic_") and word != "--critic_model_name_or_path"]
    assert check_step_flags(args, tmp_path) is None  # step 3's parser and checks accept the command
    plain = step_command(3, e2e_args(), tmp_path)
    assert "--kl_loss" not in plain and "--critic_zero_stage" in plain and "--critic_learning_rate" in plain
    # step 3's own checks, before steps 1 and 2 run
    refused = check_step_flags(e2e_args("--kl-estimator", "k1"), tmp_path)
    assert (
        refused
        == "step 3 refuses its flags: --kl_estimator sets the KL loss term: add --kl_loss, or drop --kl_estimator"
    )
    refused = check_step_flags(e2e_args("--dr-grpo", "--advantage-estimator", "rloo"), tmp_path)
    assert refused.startswith("step 3 refuses its flags: --dr_grpo modifies grpo")


def test_the_reward_is_placed_as_the_reward_and_unused_critic_flags_get_one_note(models, tmp_path, capsys):
    import accel
    from dschat_hal.args import step3_parser
    from dschat_hal.inert_flags import inert_flag_notes

    grpo = ESTIMATORS["grpo"]
    for extra in ([], ["--offload_reward_model"], ["--actor_zero_stage", "3"]):
        step3([*argv(models, tmp_path, *grpo, *extra), "--dry_run", "--device_memory", "8GiB"])
        lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("reward ")]
        assert len(lines) == 1 and "critic" not in lines[0], (extra, lines)
    step3([*argv(models, tmp_path, *grpo, "--save_interval", "0"), "--max_steps", "1", "--output_dir", ""])
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 3: reward ")]
    assert started == [
        "step 3: reward replicated on every rank (ZeRO-0: the actor, the only trained model with grpo, is ZeRO-0)"
    ]

    def notes(*flags: str) -> list[str]:
        args = step3_parser().parse_args([*argv(models, tmp_path, *flags)])
        return inert_flag_notes(args, accel.get("cpu"), 1)

    critic_flags = ["--critic_learning_rate", "1e-5", "--critic_zero_stage", "3", "--critic_lora_dim", "8"]
    critic_flags += ["--critic_gradient_checkpointing", "--lam", "0.9"]
    assert notes(*grpo, *critic_flags) == [
        "--critic_learning_rate, --critic_zero_stage, --critic_gradient_checkpointing, --critic_lora_dim, --lam are "
        "unused with --advantage_estimator grpo, which builds no critic (--critic_model_name_or_path is the reward "
        "model only)"
    ]
    assert notes(*grpo) == [] and notes(*critic_flags) == []  # PPO's critic reads them all


def test_split_rows_gives_every_micro_batch_a_row_of_a_small_last_ptx_batch():
    import torch

    from dschat_hal.rlhf.trainer import split_rows

    batch = {"input_ids": torch.arange(3).view(3, 1), "labels": torch.arange(3).view(3, 1) + 10}
    pieces = split_rows(batch, 5)  # 3 rows for 5 micro-batches: each gets one, reused in turn
    assert [p["input_ids"].flatten().tolist() for p in pieces] == [[0], [1], [2], [0], [1]]
    assert all(torch.equal(p["labels"], p["input_ids"] + 10) for p in pieces)
    even = split_rows(batch, 2)
    assert [p["input_ids"].flatten().tolist() for p in even] == [[0, 1], [2]]


def test_grpo_with_ptx_trains_on_a_smaller_last_ptx_batch(models, tmp_path):
    """GRPO (N = 2: 8 rows, 2 PPO micro-batches per step) with ptx batches of 2 rows over 5 blocks: the
    third step's ptx batch holds 1 row for the 2 micro-batches."""
    from dschat_hal.data.unsupervised import block_dataset
    from dschat_hal.errors import UserError
    from dschat_hal.models import load_tokenizer

    tokenizer, lines = load_tokenizer(str(models / "actor")), []

    def blocks() -> int:  # of --max_prompt_seq_len 48 + --max_answer_seq_len 8 tokens
        try:
            return len(block_dataset(lines, tokenizer, 56))
        except UserError:  # not one block yet
            return 0

    while blocks() < 5:
        lines.append("Keep a regular bedtime and a cool dark room.")
    assert blocks() == 5
    text = tmp_path / "ptx.txt"
    text.write_text("\n".join(lines) + "\n")
    ptx = ["--unsupervised_dataset_name", str(text), "--per_device_unsup_batch_size", "2", "--unsup_coef", "0.5"]
    run = step3([*argv(models, tmp_path, *ESTIMATORS["grpo"], *ptx, "--save_interval", "0"), "--output_dir", ""])
    assert len(run["history"]) == STEPS
    assert all(math.isfinite(record["unsup_loss"]) for record in run["history"])
    assert run["optimizer_steps"]["actor"] == run["optimizer_steps"]["planned"] == 2 * STEPS


def test_grpo_steps_on_the_hpu_backend(models, tmp_path, fake_hpu):
    """GRPO (N = 2) on the HPU backend (the recording stand-in of habana_frameworks): static shapes for the
    actor, reference and reward (no critic), mark_step around each phase, the reward placed as the reward."""
    flags = [*ESTIMATORS["grpo"], "--save_interval", "0", "--device", "hpu", "--audit_shapes"]
    run = step3([*argv(models, tmp_path, *flags), "--max_steps", "4", "--output_dir", ""])
    assert len(run["history"]) == 2 and run["optimizer_steps"] == {"planned": 2 * STEPS, "actor": 4}
    assert run["shape_counts"] == {"actor": 1, "ref": 1, "reward": 1, "actor_train": 1}
    # per PPO step: 2 in generation, 5 in the experience phase (as PPO's: one stands for the absent critic),
    # then the actor's backward and step in each of the 2 micro-batches (PPO also steps a critic there)
    assert len(fake_hpu.core.calls) == len(run["history"]) * (2 + 5 + 2 * 2)


def test_grpo_generates_tensor_parallel_on_two_ranks(models, tmp_path, monkeypatch):
    """GRPO (N = 2) with --enable_hybrid_engine --inference_tp_size 2 on 2 CPU processes under torchrun: the
    actor is sharded across both ranks for generation, each rank trains on its own prompts' groups, no critic."""
    import socket
    import sys

    from conftest import ROOT, run_script

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    flags = [*ESTIMATORS["grpo"], "--save_interval", "0", "--actor_zero_stage", "2", "--enable_hybrid_engine"]
    result = run_script(
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)),
        str(ROOT / "training/step3_rlhf_finetuning/main.py"),
        *argv(models, tmp_path, *flags),
        *("--inference_tp_size", "2", "--max_steps", "2", "--output_dir", str(tmp_path / "out")),
        env={"DS_ACCELERATOR": "cpu", "PATH": f"{sys.prefix}/bin:/usr/bin:/bin"},
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert f"hybrid engine: rank {rank}, TP group [0, 1] (index {rank} of 2): tensor-parallel copy" in output
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert len(summary["history"]) == 1 and summary["optimizer_steps"]["actor"] == 2
    assert "critic" not in summary["optimizer_steps"] and not (tmp_path / "out" / "critic").exists()


def test_a_critic_free_unit_ignores_the_unused_critic_flags_on_resume():
    import torch

    from dschat_hal.args import step3_parser, to_config
    from dschat_hal.configs import Step3Config
    from dschat_hal.loop import resume_setup as setup_of

    base = ["--actor_model_name_or_path", "tiny-opt", "--critic_model_name_or_path", "tiny-opt"]
    grpo = [*base, "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2"]
    critic_changed = ["--critic_zero_stage", "3", "--critic_lora_dim", "8"]

    def parse(argv: list[str]) -> Step3Config:
        return to_config(step3_parser().parse_args(argv), Step3Config)

    def resume_setup(config: Step3Config) -> dict:
        return setup_of(config, torch.float32)

    assert resume_setup(parse(grpo)) == resume_setup(parse([*grpo, *critic_changed]))
    assert resume_setup(parse(base)) != resume_setup(parse([*base, *critic_changed]))  # PPO's critic counts


def _cpu_step3_plan(models, tmp_path, *flags: str) -> dict:
    from dschat_hal import memory_plan
    from dschat_hal.args import step3_parser
    from dschat_hal.configs import Step3Config, to_config

    args = step3_parser().parse_args([*argv(models, tmp_path, *flags), "--device_memory", "40GiB"])
    return memory_plan.summary(memory_plan.plan_for(to_config(args, Step3Config), 3))["phases"]


def test_the_cpu_plan_keeps_a_heap_where_freed_blocks_are_reused_and_one_models_gradients_at_a_step(
    models, tmp_path, monkeypatch
):
    """Freed blocks reused (the CPU backend's default) leave a fragmented heap the plan counts per trained
    parameter; with glibc's defaults (DSCHAT_HAL_HOST_MALLOC=default) it counts none. At PPO's optimizer
    step only the stepping model's gradients are alive."""
    from dschat_hal.memory_plan.estimates import REUSED_HEAP_BYTES

    monkeypatch.delenv("DSCHAT_HAL_HOST_MALLOC", raising=False)
    reused = _cpu_step3_plan(models, tmp_path)
    monkeypatch.setenv("DSCHAT_HAL_HOST_MALLOC", "default")
    glibc = _cpu_step3_plan(models, tmp_path)
    heap = reused["training"]["heap kept for reuse"]
    assert heap > 0 and glibc["training"].get("heap kept for reuse", 0) == 0
    trained = heap / REUSED_HEAP_BYTES
    assert reused["training"]["total"] - glibc["training"]["total"] == pytest.approx(REUSED_HEAP_BYTES * trained)
    step = reused["optimizer step"]
    assert step["the other model's gradients, not alive"] < 0
    for both_backwards_first in (["--align_overflow"], ["--gradient_accumulation_steps", "2"]):
        assert "the other model's gradients, not alive" not in _cpu_step3_plan(models, tmp_path, *both_backwards_first)
    grpo = _cpu_step3_plan(models, tmp_path, "--advantage_estimator", "grpo", "--n_samples_per_prompt", "2")
    assert "the other model's gradients, not alive" not in grpo["optimizer step"]  # one trained model
