"""Step 3 provably learns on a toy task with a known optimum (CPU, fixed seed, ~1 minute).

The reward model prefers answers opening with " happy"; the SFT actor says it in about a quarter of
its answers. Measured over seeds 0, 1, 2 (kl_ctl 0.1 vs 5): feature frequency 0.26 → 0.89 / 0.91 /
0.89 (0.53 / 0.46 / 0.59 with kl_ctl 5); mean reward of fresh generations rose by 2.8 / 6.1 / 4.4
(2.2 / 1.2 / 3.1 with kl_ctl 5); final KL 1.42 / 0.80 / 0.83 (0.14 / 0.13 / 0.14 with kl_ctl 5).
The assertions use margins well inside those numbers, so a wrong KL sign, advantage sign or
clipping fails the test.

GRPO and RLOO (issue #29; 4 prompts x 4 answers per step, as many steps as PPO), seeds 0, 1, 2: reward
rise 6.0 / 7.7 / 4.0 (GRPO) and 6.4 / 7.0 / 4.9 (RLOO); feature frequency 0.72-0.84 / 0.85-0.90; final
KL with kl_ctl 5 at 0.06-0.51 of kl_ctl 0.1's.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from dschat_hal.data.toy_task import FEATURE, write_feature_task
from dschat_hal.models import load_tokenizer
from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3

SEED = 0


def feature_frequency(actor_dir, prompts: list[str]) -> float:
    """Share of sampled answers (two per prompt) containing the feature token."""
    tokenizer = load_tokenizer(str(actor_dir))
    tokenizer.padding_side = "left"
    feature_id = tokenizer(FEATURE, add_special_tokens=False)["input_ids"][0]
    model = AutoModelForCausalLM.from_pretrained(actor_dir).eval()
    torch.manual_seed(0)
    inputs = tokenizer(prompts * 2, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)
    return (out[:, inputs["input_ids"].size(1) :] == feature_id).any(-1).float().mean().item()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    paths = write_feature_task(root / "data", seed=SEED)
    common = ["--device", "cpu", "--dtype", "fp32", "--data_output_path", str(root / "cache"), "--seed", str(SEED)]
    step1(
        [
            *common,
            "--model_name_or_path",
            "tiny-opt",
            "--per_device_train_batch_size",
            "8",
            "--data_path",
            str(paths["sft"]),
            "--data_split",
            "1,0,0",
            "--max_seq_len",
            "64",
            "--num_train_epochs",
            "4",
            "--learning_rate",
            "3e-3",
            "--output_dir",
            str(root / "sft"),
        ]
    )
    rm = step2(
        [
            *common,
            "--model_name_or_path",
            "tiny-opt",
            "--per_device_train_batch_size",
            "8",
            "--data_path",
            str(paths["rm"]),
            "--data_split",
            "0,1,0",
            "--max_seq_len",
            "64",
            "--learning_rate",
            "1e-3",
            "--output_dir",
            str(root / "rm"),
        ]
    )
    assert rm["accuracy"] > 0.95

    def ppo(kl_ctl: str, *extra: str, name: str | None = None) -> dict:
        name = name or f"ppo_kl{kl_ctl}"
        result = step3(
            [
                *common,
                "--actor_model_name_or_path",
                str(root / "sft"),
                "--critic_model_name_or_path",
                str(root / "rm"),
                "--data_path",
                str(paths["sft"]),
                "--data_split",
                "0,0,1",
                "--max_prompt_seq_len",
                "48",
                "--max_answer_seq_len",
                "12",
                "--per_device_generation_batch_size",
                "16",
                "--per_device_training_batch_size",
                "16",
                "--actor_learning_rate",
                "1e-3",
                "--critic_learning_rate",
                "1e-3",
                "--kl_ctl",
                kl_ctl,
                "--num_warmup_steps",
                "0",
                "--actor_dropout",
                "0.0",
                "--critic_dropout",
                "0.0",
                "--output_dir",
                str(root / name),
                *extra,
            ]
        )
        history = result["history"]
        return {
            "rise": statistics.mean(h["reward"] for h in history[-3:])
            - statistics.mean(h["reward"] for h in history[:3]),
            "kl": statistics.mean(h["kl"] for h in history[-5:]),
            "kl_trace": [h["kl"] for h in history],
            "steps": len(history),
            "actor": root / name / "actor",
            "output": root / name,
        }

    prompts = [row["prompt"] for row in json.loads((paths["sft"] / "eval.json").read_text())]
    return {"sft": root / "sft", "default": ppo("0.1"), "strong_kl": ppo("5"), "prompts": prompts, "run": ppo}


def test_reward_of_fresh_generations_rises(toy):
    assert toy["default"]["rise"] > 1.0


def test_feature_frequency_rises(toy):
    before = feature_frequency(toy["sft"], toy["prompts"])
    after = feature_frequency(toy["default"]["actor"], toy["prompts"])
    assert before < 0.45
    assert after > before + 0.3


def test_strong_kl_penalty_keeps_the_policy_close(toy):
    default, strong = toy["default"], toy["strong_kl"]
    assert strong["kl"] < 0.75 * default["kl"]
    assert max(strong["kl_trace"]) < max(default["kl_trace"])
    assert strong["rise"] < default["rise"]
    assert (
        feature_frequency(strong["actor"], toy["prompts"]) < feature_frequency(default["actor"], toy["prompts"]) - 0.15
    )


# ---- critic-free estimators (issue #29) -------------------------------------------------------
@pytest.fixture(scope="module")
def critic_free(toy):
    """GRPO and RLOO on the same task: 4 prompts x 4 answers per step (PPO's 16 rows), as many steps
    as PPO took; made once per estimator."""
    runs = {}

    def run(estimator: str, kl_ctl: str = "0.1") -> dict:
        if (estimator, kl_ctl) not in runs:
            runs[estimator, kl_ctl] = toy["run"](
                kl_ctl,
                *("--advantage_estimator", estimator, "--n_samples_per_prompt", "4"),
                *("--per_device_generation_batch_size", "4", "--max_steps", str(toy["default"]["steps"])),
                name=f"{estimator}_kl{kl_ctl}",
            )
        return runs[estimator, kl_ctl]

    return run


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_learn_the_toy_task(estimator, critic_free, toy):
    result = critic_free(estimator)
    assert result["rise"] > 1.0
    assert feature_frequency(result["actor"], toy["prompts"]) > feature_frequency(toy["sft"], toy["prompts"]) + 0.3
    assert not (result["output"] / "critic").exists()  # no critic trained or saved


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_kl_penalty_bounds_the_kl(estimator, critic_free):
    default, strong = critic_free(estimator), critic_free(estimator, "5")
    assert all(math.isfinite(kl) for kl in default["kl_trace"] + strong["kl_trace"])
    assert strong["kl"] < 0.75 * default["kl"]
    assert max(strong["kl_trace"]) < max(default["kl_trace"])
