"""Critic-free step 3 (issue #29) end to end on tiny random models: no critic is built, planned,
checkpointed or saved; a run stopped by --max_steps resumes exactly (losses and actor weights);
e2e passes the estimator through to step 3. The estimators' maths: tests/test_advantages.py;
learning the toy task: tests/test_ppo_learns.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_resume_epochs import assert_same_weights, interrupted_then_resumed

from training.step3_rlhf_finetuning.main import main as step3

STEPS = 3  # prompt batches in the run below: 12 prompts, 4 per batch


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm

    root = tmp_path_factory.mktemp("critic_free_models")
    tokenizer = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tokenizer, seed=1), tokenizer, root / "actor")
    create_reward_model("tiny-opt", tokenizer, seed=2).save(root / "reward", tokenizer)
    return root


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

    def plan(*flags: str) -> dict:
        args = step3_parser().parse_args(
            [*argv(models, tmp_path, *flags), "--device_memory", "40GiB", "--actor_zero_stage", "2"]
        )
        return memory_plan.summary(memory_plan.plan_for(args, 3))

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
