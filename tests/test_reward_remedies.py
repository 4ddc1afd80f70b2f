"""Step 3's reward reporting and remedies: clipped share and warning, centring, normalisation,
advantage whitening; --max_steps, the warmup warning and held-out reward before/after."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_script, tiny_step1_argv, tiny_step3_argv

from dschat_hal.rlhf.reward_shaping import ClipWarning, RewardShaper, RunningMoments, clipped_share, whiten
from dschat_hal.rlhf.schedule import warmup_warning
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3


def test_running_moments_match_the_whole_sample():
    batches = [torch.tensor([1.0, 2.0, 6.0]), torch.tensor([-3.0, 0.5]), torch.tensor([10.0, 4.0, 4.0, 1.0])]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.count == everything.numel()
    assert moments.mean.item() == pytest.approx(everything.mean().item())
    assert moments.var.item() == pytest.approx(everything.var(unbiased=False).item())


def test_shaper_centres_then_standardises():
    scores = torch.tensor([-6.0, -5.5, -5.0, -4.5])
    assert RewardShaper(center=-5.25)(scores).tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    normalised = RewardShaper(normalize=True)(scores)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert RewardShaper()(scores).equal(scores)  # upstream: the raw score


def test_clipped_share_and_whitening():
    assert clipped_share(torch.tensor([-5.5, -5.0, 4.9, 7.0]), 5.0).item() == 0.75
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    white = whiten(values, mask)
    kept = white[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert white[~mask.bool()].abs().max().item() == 0.0


def test_clip_warning_says_it_once(capsys):
    warning = ClipWarning(5.0)
    assert not warning.check(0.5, -5.5)  # half is not "most"
    assert warning.check(0.9, -5.5)
    assert not warning.check(1.0, -5.5)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "90% of rewards are clipped to ±5" in err and "--center_reward" in err


def test_warmup_warning():
    assert warmup_warning(100, 40) and "reaches 40% of its peak" in warmup_warning(100, 40)
    assert "the 6 optimizer steps" in warmup_warning(10, 40, max_steps=6)
    assert warmup_warning(0, 40) is None and warmup_warning(10, 40) is None


def test_clipped_rewards_max_steps_warmup_and_held_out_reward(e2e_output, tmp_path, capsys):
    result = step3(
        [
            *tiny_step3_argv(e2e_output, tmp_path),
            *("--clip_reward_value", "0.01", "--max_steps", "2", "--num_warmup_steps", "100", "--log_interval", "1"),
            *("--eval_interval", "100", "--eval_iters", "1"),
        ]
    )
    out, err = capsys.readouterr()
    history = result["history"]
    assert len(history) == 2 and result["optimizer_steps"]["actor"] == 2  # --max_steps, not the epoch
    assert all(h["clipped"] == 1.0 and abs(h["reward_used"]) <= 0.01 + 1e-6 for h in history)
    assert all(abs(h["reward"]) > 0.01 for h in history)  # the raw score, reported beside the used one
    assert "reward used" in out and "(100% clipped), raw" in out
    assert err.count("rewards are clipped") == 1
    assert "--num_warmup_steps 100 >= the 2 optimizer steps this run takes" in err
    assert [e["step"] for e in result["evaluations"]] == [0, 2]  # held-out reward before and after
    assert "MA " not in out and "CPU Virtual Memory" not in out


def test_normalize_reward_and_whiten_advantages(e2e_output, tmp_path):
    history = step3(
        [
            *tiny_step3_argv(e2e_output, tmp_path, batch=4),
            *("--normalize_reward", "--whiten_advantages", "--max_steps", "2", "--log_interval", "1"),
        ]
    )["history"]
    assert abs(history[0]["reward_used"]) < 1e-5  # the first batch standardised by its own moments
    assert abs(history[0]["reward"]) > 0.1
    assert all(abs(h["advantage"]) < 1e-5 for h in history)  # whitened: mean 0 over the answer tokens


def test_center_reward_stored_by_step2_and_subtracted_in_step3(e2e_output, tmp_path, capsys):
    with pytest.raises(SystemExit):  # the demo's reward model stored no mean
        step3([*tiny_step3_argv(e2e_output, tmp_path), "--center_reward"])
    assert "has no stored mean training score; rerun step 2 with --center_reward" in capsys.readouterr().err
    reward_dir = tmp_path / "reward"
    rm = step2(
        [
            *tiny_step1_argv(tmp_path, "--model_name_or_path", "tiny-opt", "--max_steps", "2"),
            *("--center_reward", "--eval_iters", "2", "--output_dir", str(reward_dir)),
        ]
    )
    stored = json.loads((reward_dir / "reward_model.json").read_text())["score_mean"]
    assert stored == pytest.approx(rm["score_mean"])
    argv = tiny_step3_argv(e2e_output, tmp_path)
    argv[argv.index("--critic_model_name_or_path") + 1] = str(reward_dir)
    history = step3(
        [*argv, "--center_reward", "--clip_reward_value", "1000", "--max_steps", "2", "--log_interval", "1"]
    )["history"]
    assert all(h["reward_used"] == pytest.approx(h["reward"] - stored, abs=1e-4) for h in history)
    assert f"mean training score {stored:.3f} is subtracted" in capsys.readouterr().out


def test_deepspeed_memory_reports_silenced_unless_verbose():
    """In a fresh process (start-up silences them once per process)."""
    code = (
        "import deepspeed.runtime.bf16_optimizer as bf16\n"
        "from dschat_hal import runtime\n"
        "runtime._silence_deepspeed(verbose=True)\n"
        "bf16.see_memory_usage('probe one', force=True)\n"  # what its bf16 optimizer prints at every start
        "runtime._silence_deepspeed()\n"
        "bf16.see_memory_usage('probe two', force=True)\n"
    )
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe one" in result.stdout and "probe two" not in result.stdout
