"""Each step end to end for the opt, bloom and llama tiny configs, in process, with learning checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import TINY_STEP3_OPTIM, run_script, tiny_step1_argv
from transformers import AutoModelForCausalLM

from dschat_hal.models import create_reward_model, load_tokenizer
from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3


def common(tmp_path, family):
    return ["--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache"), "--seed", "3"]


@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
def test_three_steps_for_each_family(tmp_path, family):
    base = f"tiny-{family}"
    sft = step1(
        [
            *common(tmp_path, family),
            "--model_name_or_path",
            base,
            "--per_device_train_batch_size",
            "8",
            "--max_seq_len",
            "96",
            "--num_train_epochs",
            "3",
            "--learning_rate",
            "3e-3",
            "--zero_stage",
            "2",
            "--dtype",
            "bf16",
            "--output_dir",
            str(tmp_path / "actor"),
        ]
    )
    assert sft["perplexity"] < sft["perplexity_before"] / 2  # SFT learned the bundled answers
    rm = step2(
        [
            *common(tmp_path, family),
            "--model_name_or_path",
            base,
            "--per_device_train_batch_size",
            "8",
            "--max_seq_len",
            "96",
            "--num_train_epochs",
            "2",
            "--learning_rate",
            "1e-3",
            "--zero_stage",
            "3",
            "--output_dir",
            str(tmp_path / "reward"),
        ]
    )
    assert rm["accuracy"] > 0.9 and rm["before"]["accuracy"] < 0.9  # the separable toy set is learned
    assert rm["chosen_score"] > rm["rejected_score"]
    rl = step3(
        [
            *common(tmp_path, family),
            "--actor_model_name_or_path",
            str(tmp_path / "actor"),
            "--critic_model_name_or_path",
            str(tmp_path / "reward"),
            "--max_prompt_seq_len",
            "48",
            "--max_answer_seq_len",
            "16",
            "--per_device_generation_batch_size",
            "4",
            "--per_device_training_batch_size",
            "2",
            *TINY_STEP3_OPTIM,
            "--enable_test_mode",
            "--test_stop_step",
            "3",
            "--output_dir",
            str(tmp_path / "rlhf"),
        ]
    )
    assert len(rl["history"]) == 3
    for record in rl["history"]:
        assert all(math.isfinite(v) for v in record.values())
    actor = AutoModelForCausalLM.from_pretrained(tmp_path / "rlhf" / "actor")
    assert actor.config.model_type == family
    tokenizer = load_tokenizer(str(tmp_path / "rlhf" / "actor"))
    critic = create_reward_model(str(tmp_path / "rlhf" / "critic"), tokenizer)
    assert critic.config.model_type == family


def test_a_step_names_its_optimizer_and_keeps_deepspeeds_untested_optimizer_caution_out(tmp_path):
    """ZeRO is given torch's fused AdamW on purpose: one `optimizer:` start-up line says so, and
    DeepSpeed's "untested optimizer, proceed with caution" is kept out (it shows with --verbose)."""
    argv = tiny_step1_argv(tmp_path, "--zero_stage", "2", "--max_steps", "1", "--output_dir", str(tmp_path / "o"))
    result = run_script("training/step1_supervised_finetuning/main.py", *argv, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "untested optimizer" not in output
    assert [line for line in result.stdout.splitlines() if line.startswith("optimizer:")] == [
        "optimizer: torch.optim.AdamW(fused=True)"
    ]
    assert output.count("answers end at") == 1  # each start-up fact once (the memory plan's tokenizer said it again)


def test_a_step_without_output_dir_saves_to_its_default_and_says_so(tmp_path, capsys):
    """Upstream saves nothing without --output_dir, silently; here step 1 saves to output/actor
    (under a temporary directory in tests) and its start-up lines say where; '' saves nothing, said."""
    import dschat_hal.args

    default = Path(dschat_hal.args.DEFAULT_OUTPUT_ROOT) / "actor"
    step1(tiny_step1_argv(tmp_path, "--max_steps", "1"))
    out = capsys.readouterr().out.splitlines()
    assert (default / "model.safetensors").is_file() and (default / "config.json").is_file()
    assert f"saving the trained model to {default} at the end (no --output_dir given; " in "\n".join(out[:3])
    step1(tiny_step1_argv(tmp_path, "--max_steps", "1", "--seed", "5", "--output_dir", ""))
    out = capsys.readouterr().out.splitlines()
    assert "--output_dir '': the trained model will not be saved" in out[:3]
