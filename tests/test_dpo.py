"""DPO (issue #29): the loss and log-prob sums against a plain reference on hand-made tensors, the chosen/rejected
reward margin rising on the bundled pairs with a tiny model, the output loaded by step 3 as its actor, --resume,
and e2e's --dpo command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_step1_argv
from transformers import AutoModelForCausalLM

from dschat_hal.dpo import dpo_loss, pair_label_mask, pair_logps, sequence_logps
from training.step2_dpo_finetuning.main import main as dpo


# ---- pure functions -------------------------------------------------------------------------
def test_label_mask_scores_each_pair_from_its_first_difference():
    # pair 0 differs at position 2; pair 1 at position 3 (the rejected row is shorter: padding ends earlier);
    # pair 2 is identical (every real token scored, as upstream does)
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 0],
            [5, 6, 7, 9, 4],
            [3, 3, 3, 0, 0],
            [5, 6, 9, 8, 0],
            [5, 6, 7, 0, 0],
            [3, 3, 3, 0, 0],
        ]
    )
    mask = torch.tensor(
        [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    )
    expected = torch.tensor(
        [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    )
    assert torch.equal(pair_label_mask(ids, mask), expected)


def test_sequence_logps_sum_the_masked_next_token_log_probs():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    expected = []
    for row in range(2):
        total = 0.0
        for t in range(1, 4):  # token t is predicted by the logits at t-1
            if mask[row, t]:
                total += math.log(torch.softmax(logits[row, t - 1].double(), -1)[ids[row, t]].item())
        expected.append(total)
    assert sequence_logps(logits, ids, mask).tolist() == pytest.approx(expected, abs=1e-5)
    chosen, rejected = pair_logps(logits, ids, mask)
    assert chosen.tolist() == pytest.approx(expected[:1], abs=1e-5)
    assert rejected.tolist() == pytest.approx(expected[1:], abs=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_and_rewards_match_the_formula(smoothing):
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -4.5])
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta, smoothing)
    losses = []
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        sig = 1 / (1 + math.exp(-z))
        losses.append(-(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig))
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])  # beta * (policy - reference)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    assert not out.chosen_rewards.requires_grad


def test_equal_policy_and_reference_give_log_2():
    logps = torch.tensor([-2.0, -7.0])
    out = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))


# ---- training -------------------------------------------------------------------------------
def dpo_argv(tmp: Path, *extra: str) -> list[str]:
    return tiny_step1_argv(tmp, "--dtype", "fp32", "--seed", "5", "--quiet", "--eval_iters", "2", *extra)


def test_dpo_raises_the_reward_margin_and_saves_an_actor_step3_loads(tmp_path):
    out = tmp_path / "dpo"
    result = dpo([*dpo_argv(tmp_path), "--max_steps", "4", "--dropout", "0.0", "--output_dir", str(out)])
    before = result["before"]
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert result["reward_margin"] > before["reward_margin"] + 0.05
    assert result["chosen_reward"] > result["rejected_reward"]
    assert result["loss"] < before["loss"]
    # saved whole, as a causal LM, with its record and nothing half-written beside it
    assert {"config.json", "model.safetensors", "made_by.json", "args.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "opt"
    assert json.loads((out / "args.json").read_text())["beta"] == 0.1  # upstream's default
    from training.step3_rlhf_finetuning.main import main as step3

    rl = step3(
        [
            *("--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache")),
            *("--actor_model_name_or_path", str(out), "--critic_model_name_or_path", "tiny-opt"),
            *("--allow_random_critic", "--max_prompt_seq_len", "32", "--max_answer_seq_len", "4"),
            *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"),
            *("--enable_test_mode", "--test_stop_step", "1", "--output_dir", ""),
        ]
    )
    assert len(rl["history"]) == 1


def test_dpo_resume_continues_the_uninterrupted_run(tmp_path):
    args = dpo_argv(
        tmp_path, "--data_split", "6,6,88", "--num_train_epochs", "2", "--print_loss", "--save_interval", "1"
    )
    reference = dpo([*args, "--output_dir", str(tmp_path / "full")])
    full = reference["losses"]
    assert len(full) == 6, "the data no longer gives 3 batches per epoch: adjust --data_split"
    run = tmp_path / "run"
    dpo([*args, "--output_dir", str(run), "--max_steps", "4"])
    resumed = dpo([*args, "--output_dir", str(run), "--resume"])
    assert resumed["losses"] == pytest.approx(full[4:], abs=1e-5)
    assert resumed["reward_margin"] == pytest.approx(reference["reward_margin"], abs=1e-5)


# ---- e2e --dpo ------------------------------------------------------------------------------
def test_e2e_dpo_runs_step1_then_dpo_on_its_actor(tmp_path):
    from training import e2e_rlhf

    args = e2e_rlhf.parse_args(["--dpo", "--output-dir", str(tmp_path)])
    assert args.step == [1, 2]
    cmd = e2e_rlhf.step_command(2, args, tmp_path)
    assert cmd[1] == str(e2e_rlhf.DPO_SCRIPT)
    flags = cmd[2:]
    assert flags[flags.index("--model_name_or_path") + 1] == str(tmp_path / "actor")
    assert flags[flags.index("--output_dir") + 1] == str(tmp_path / "dpo")
    assert e2e_rlhf.check_step_flags(args, tmp_path) is None  # DPO's own parser accepts the command
    plain = e2e_rlhf.parse_args(["--output-dir", str(tmp_path)])
    assert plain.step == [1, 2, 3] and e2e_rlhf.step_command(2, plain, tmp_path)[1] == str(e2e_rlhf.SCRIPTS[2])


def test_e2e_dpo_end_to_end(tmp_path, capsys):
    from training.e2e_rlhf import main as e2e

    steps = "--max_steps 3 --num_train_epochs 1 --max_seq_len 64"
    code = e2e(["--dpo", "--output-dir", str(tmp_path), "--step1-args", steps, "--step2-args", steps])
    assert code == 0
    summary = json.loads((tmp_path / "dpo" / "training_summary.json").read_text())
    assert summary["reward_margin"] > summary["before"]["reward_margin"]
    assert "DPO reward margin" in capsys.readouterr().out
    assert not (tmp_path / "reward").exists() and not (tmp_path / "rlhf").exists()


def test_flags_and_defaults_are_upstreams_dpo_main():
    """The defaults of upstream's step2_dpo_finetuning/main.py (dtype and --lora_module_name follow the project's
    shared choices, as in the other steps), each shown in --help."""
    from dschat_hal.args import dpo_parser

    parser = dpo_parser()
    upstream = {
        "beta": 0.1,
        "label_smoothing": 0.0,
        "learning_rate": 1e-3,
        "lora_learning_rate": 5e-4,
        "data_split": "2,4,4",
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "max_seq_len": 512,
        "weight_decay": 0.0,
        "num_train_epochs": 1,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "cosine",
        "num_warmup_steps": 0,
        "seed": 1234,
        "zero_stage": 0,
        "offload_reference_model": False,
        "tensorboard_path": "step2_tensorboard",
    }
    assert {k: parser.get_default(k) for k in upstream} == upstream
    text = " ".join(parser.format_help().split())
    assert "--beta BETA DPO temperature" in text and "(default: 0.1)" in text


def test_zero3_partitions_the_reference_as_step3_does(tmp_path, capsys):
    from dschat_hal.configs import DPOStepConfig, with_flags
    from dschat_hal.dpo import reference_placement

    def placed(stage: int, asked: str = "auto", offload: bool = False):
        flags = {"zero_stage": stage, "reference_zero_stage": asked, "offload_reference_model": offload}
        at = reference_placement(with_flags(DPOStepConfig(), flags))
        return at.stage, at.offload

    assert placed(2) == (0, False) and placed(3) == (3, False)
    assert placed(2, "3") == (3, False) and placed(0, offload=True) == (3, True)
    result = dpo([*dpo_argv(tmp_path), "--zero_stage", "3", "--max_steps", "2", "--output_dir", str(tmp_path / "z3")])
    assert "DPO: reference partitioned across 1 rank(s)" in capsys.readouterr().out
    assert result["reward_margin"] > result["before"]["reward_margin"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "z3").num_parameters() > 0


# ---- memory plan ----------------------------------------------------------------------------
def test_dpo_dry_run_plans_the_policy_beside_the_reference_step3_would_place(tmp_path, capsys):
    from conftest import ROOT

    from dschat_hal import memory_plan
    from dschat_hal.args import step3_parser
    from dschat_hal.configs import Step3Config, to_config
    from training.step1_supervised_finetuning.main import main as step1

    model = str(ROOT / "benchmarks" / "model_configs" / "opt-1.3b")
    where = ["--device", "cuda", "--num_devices", "2", "--device_memory", "80GiB"]
    base = ["--model_name_or_path", model, *where, "--per_device_train_batch_size", "4", "--max_seq_len", "512"]
    plan = dpo([*base, "--dry_run", "--output_dir", str(tmp_path / "dpo")])
    out = capsys.readouterr().out
    assert "memory plan, step 2: 2 rank(s) on cuda" in out and "DPO, " in out and "(chosen + rejected)" in out
    assert "reference replicated on every rank" in out and plan["fits"] is True
    assert not (tmp_path / "dpo").exists()  # nothing loaded or written
    training = plan["phases"]["training"]
    # the reference weighs what step 3's reference of the same actor weighs
    models = ["--actor_model_name_or_path", model, "--critic_model_name_or_path", model]
    rlhf = to_config(step3_parser().parse_args([*models, *where, "--actor_zero_stage", "0"]), Step3Config)
    assert (
        training["reference"] == memory_plan.summary(memory_plan.plan_for(rlhf, 3))["phases"]["training"]["reference"]
    )
    # the policy's part is step 1's plan of the same rows (chosen + rejected), with its logits in fp32
    rows = ["--per_device_train_batch_size", "8", "--max_seq_len", "512"]
    sft = step1(["--model_name_or_path", model, *where, *rows, "--dry_run", "--compute_fp32_loss"])
    sft = sft["phases"]["training"]
    assert training["training states"] == sft["training states"] and training["activations"] == sft["activations"]
    assert training["total"] > sft["total"] + training["reference"]  # + the reference's forward
    capsys.readouterr()
    zero3 = dpo([*base, "--dry_run", "--zero_stage", "3"])["phases"]["training"]
    assert zero3["reference"] == training["reference"] / 2  # partitioned, as step 3 partitions it
    assert "reference partitioned across 2 rank(s)" in capsys.readouterr().out
    offloaded = dpo([*base, "--dry_run", "--offload_reference_model"])
    assert offloaded["phases"]["training"]["reference"] == 0 and offloaded["host_bytes"] > 0


def test_dpo_refuses_before_loading_weights_when_its_plan_does_not_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo([*dpo_argv(tmp_path), "--device_memory", "64MiB", "--output_dir", str(tmp_path / "dpo")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the memory plan says DPO does not fit: its ") and "--dry_run shows" in error


def test_e2e_dry_run_plans_step1_and_dpo(tmp_path, capsys):
    from training.e2e_rlhf import main as e2e

    assert e2e(["--dpo", "--dry-run", "--output-dir", str(tmp_path / "out"), "--device-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan, step 1" in out and "memory plan, step 2" in out and "DPO, tiny-opt" in out
    assert not (tmp_path / "out").exists()


def test_training_plan_takes_dpo_as_a_step(capsys):
    """`training/plan.py dpo FLAGS`: DPO's plan from the flags alone, as `--dry_run` prints it."""
    from conftest import ROOT

    from training.plan import main as plan

    model = str(ROOT / "benchmarks" / "model_configs" / "opt-1.3b")
    flags = ["--model_name_or_path", model, "--device", "cuda", "--num_devices", "1", "--device_memory", "80GiB"]
    assert plan(["dpo", *flags]) == 0
    out = capsys.readouterr().out
    assert "memory plan, step 2:" in out and "DPO, " in out and "reference" in out
