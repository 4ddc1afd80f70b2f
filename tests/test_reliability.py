"""Bad input gives one clear line and exit code 2; checkpoints resume exactly; bad training stops."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_step1_argv, tiny_step3_argv

from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3


def fails_with(capsys, main, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def base(tmp_path):
    return tiny_step1_argv(tmp_path)


def test_malformed_json_names_file_and_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text('[{"prompt": "x",')
    fails_with(capsys, step1, [*base(tmp_path), "--data_path", str(tmp_path / "d")], "train.json is not valid JSON")


def test_missing_key_names_row_and_key(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text(
        json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}])
    )
    fails_with(capsys, step2, [*base(tmp_path), "--data_path", str(tmp_path / "d")], "row 1 has no string 'chosen'")


def test_unknown_data_path(tmp_path, capsys):
    fails_with(capsys, step1, [*base(tmp_path), "--data_path", "nobody/nothing"], "neither a known dataset")


def test_empty_split(tmp_path, capsys):
    fails_with(capsys, step2, [*base(tmp_path), "--data_split", "1,0,0"], "step 2 gets no training rows")


def test_model_path_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    fails_with(capsys, step1, [*base(tmp_path), "--model_name_or_path", str(tmp_path / "m")], "has no config.json")


def test_device_not_present(tmp_path, capsys):
    fails_with(
        capsys, step1, [*base(tmp_path), "--device", "hpu"], "HPU requested but habana_frameworks is not importable"
    )


def test_unknown_device_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step1([*base(tmp_path), "--device", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_fp16_on_cpu(tmp_path, capsys):
    fails_with(capsys, step1, [*base(tmp_path), "--dtype", "fp16"], "--dtype fp16 is not supported on cpu")


def test_contradictory_lora_flags(tmp_path, capsys):
    fails_with(capsys, step1, [*base(tmp_path), "--only_optimize_lora"], "--only_optimize_lora needs LoRA")


def test_every_prompt_too_long(tmp_path, capsys, e2e_output):
    fails_with(
        capsys,
        step3,
        [*tiny_step3_argv(e2e_output, tmp_path), "--max_prompt_seq_len", "3"],
        "longer than --max_prompt_seq_len 3",
    )


def test_step3_without_a_step2_checkpoint(tmp_path, capsys, e2e_output):
    fails_with(
        capsys,
        step3,
        [*tiny_step3_argv(e2e_output, tmp_path), "--critic_model_name_or_path", str(e2e_output / "actor")],
        "run step 2 first",
    )
    fails_with(
        capsys,
        step3,
        [
            "--device",
            "cpu",
            "--actor_model_name_or_path",
            str(e2e_output / "actor"),
            "--critic_model_name_or_path",
            str(tmp_path / "missing"),
        ],
        "is not a model directory",
    )


def test_debug_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        step1([*base(tmp_path), "--model_name_or_path", str(tmp_path / "m"), "--debug"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" in err and "has no config.json" in err.splitlines()[-1]


def test_resume_after_a_kill_continues_the_same_loss_curve(tmp_path):
    args = [*base(tmp_path), "--num_train_epochs", "2", "--print_loss", "--seed", "5", "--learning_rate", "2e-3"]
    full = step1([*args, "--output_dir", str(tmp_path / "full")])["losses"]
    killed = step1([*args, "--output_dir", str(tmp_path / "run"), "--save_interval", "1", "--max_steps", "7"])["losses"]
    resumed = step1([*args, "--output_dir", str(tmp_path / "run"), "--resume"])["losses"]
    assert len(full) == 20 and len(killed) == 7 and len(resumed) == 13
    assert killed == pytest.approx(full[:7], abs=1e-6)
    assert resumed == pytest.approx(full[7:], abs=1e-5)
    assert (tmp_path / "run_checkpoints" / "latest").read_text().strip() == "global_step7"
    assert (tmp_path / "run_checkpoints" / "global_step7" / "step1").is_dir()


def test_non_finite_loss_stops_training(tmp_path, capsys):
    fails_with(
        capsys,
        step1,
        [
            *base(tmp_path),
            "--learning_rate",
            "1e6",
            "--lr_scheduler_type",
            "constant",
            "--num_train_epochs",
            "3",
            "--log_interval",
            "1",
        ],
        "training stopped:",
    )


def test_step3_resume_continues_the_same_rewards(tmp_path, e2e_output):
    args = [
        *tiny_step3_argv(e2e_output, tmp_path, answer=8, batch=4),
        "--seed",
        "9",
        "--enable_test_mode",
    ]
    full = step3([*args, "--test_stop_step", "4", "--output_dir", str(tmp_path / "full")])["history"]
    step3([*args, "--test_stop_step", "2", "--save_interval", "1", "--output_dir", str(tmp_path / "run")])
    resumed = step3([*args, "--test_stop_step", "4", "--resume", "--output_dir", str(tmp_path / "run")])["history"]
    assert len(resumed) == 2
    for key in ("reward", "actor_loss", "critic_loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in full[2:]], abs=1e-4), key
