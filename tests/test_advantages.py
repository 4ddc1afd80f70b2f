"""Critic-free advantage estimators (issue #29) against small reference loops on hand-made rewards:
groups with equal rewards (std 0), n = 2, answers that end early, a row with no usable answer."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_hal.rlhf import advantages, ppo_math

START, T = 2, 8  # positions [2, 8): six answer positions


def reference_scores(estimator: str, rewards: list[float], n: int, baseline=None, std_normalize=True) -> list[float]:
    """b_i, one row at a time."""
    out = []
    for i, r in enumerate(rewards):
        group = rewards[i // n * n : i // n * n + n]
        mean = sum(group) / n
        if estimator == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
            out.append((r - mean) / (std + 1e-6) if std_normalize else r - mean)
        elif estimator == "rloo":
            others = group[: i % n] + group[i % n + 1 :]
            out.append(r - sum(others) / (n - 1))
        elif estimator == "remax":
            out.append(r - baseline[i])
        else:
            out.append(r)
    return out


def reference_advantages(scores, log_probs, ref_log_probs, mask, kl_ctl, gamma) -> list[list[float]]:
    """A_t by a backward loop over each row's answer positions."""
    table = []
    for i, b in enumerate(scores):
        answer = [t for t in range(START, T) if mask[i][t]]
        last = answer[-1] if answer else None
        row, running = [0.0] * (T - START), 0.0
        for t in reversed(range(START, T)):
            reward = 0.0
            if mask[i][t]:
                reward = -kl_ctl * (log_probs[i][t] - ref_log_probs[i][t]) + (b if t == last else 0.0)
            running = reward + gamma * running
            row[t - START] = running if mask[i][t] else 0.0
        table.append(row)
    return table


def batch(rows: int, seed: int = 0):
    """Random log-probs and an action mask with answers of several lengths, one ending at once (≤ 1
    token, masked out entirely as the trainer does) and one running to the end."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(rows, T, generator=gen, dtype=torch.float64)
    ref_log_probs = -torch.rand(rows, T, generator=gen, dtype=torch.float64)
    lengths = [(T - START) if i % 3 == 0 else 0 if i % 4 == 1 else 1 + i % (T - START - 1) for i in range(rows)]
    mask = torch.zeros(rows, T, dtype=torch.long)
    mask[:, :START] = 1
    for i, length in enumerate(lengths):
        mask[i, START : START + length] = 1
    return log_probs, ref_log_probs, mask


def check(estimator, rewards, n, kl_ctl=0.1, gamma=1.0, baseline=None, std_normalize=True):
    log_probs, ref_log_probs, mask = batch(len(rewards))
    scores = advantages.sequence_scores(
        estimator,
        torch.tensor(rewards, dtype=torch.float64),
        n,
        std_normalize=std_normalize,
        baseline=None if baseline is None else torch.tensor(baseline),
    )
    expected_scores = reference_scores(estimator, rewards, n, baseline, std_normalize)
    assert scores.tolist() == pytest.approx(expected_scores, abs=1e-6)
    got = advantages.token_advantages(log_probs, ref_log_probs, scores, mask, START, kl_ctl, gamma)
    expected = reference_advantages(
        expected_scores, log_probs.tolist(), ref_log_probs.tolist(), mask.tolist(), kl_ctl, gamma
    )
    assert torch.isfinite(got).all()
    assert got.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    return got, mask


REWARDS = [1.0, -0.5, 2.0, 0.25, 3.0, 3.0, 3.0, 3.0]  # a varied group of 4, then one with equal rewards


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_group_estimators_match_the_reference(estimator, n, gamma):
    got, mask = check(estimator, REWARDS, n, gamma=gamma)
    assert (got[mask[:, START:] == 0] == 0).all()  # nothing after an answer's end


def test_group_of_equal_rewards_gives_only_the_kl_term():
    got, _ = check("grpo", REWARDS, 4, kl_ctl=0.0)
    assert (got[4:] == 0).all()  # std 0: advantage 0, no NaN
    assert got[:4].abs().sum() > 0


def test_dr_grpo_does_not_divide_by_the_std():
    check("grpo", REWARDS, 4, std_normalize=False)
    scores = advantages.sequence_scores("grpo", torch.tensor([1.0, 3.0]), 2, std_normalize=False)
    assert scores.tolist() == [-1.0, 1.0]


def test_rloo_with_two_answers_is_the_reward_difference():
    scores = advantages.sequence_scores("rloo", torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
    assert scores.tolist() == [-2.0, 2.0, 0.0, 0.0]


def test_remax_subtracts_the_greedy_reward():
    check("remax", REWARDS, 1, baseline=[0.5, 0.5, -1.0, 2.0, 3.0, 0.0, 1.0, 4.0])


def test_reinforce_pp_returns_then_batch_whitening():
    got, mask = check("reinforce_pp", REWARDS, 1, gamma=0.95)
    answer = mask[:, START:]
    halves = advantages.whiten_batch([got[:3], got[3:]], [answer[:3], answer[3:]])
    whole = torch.cat(halves)
    values = [v for v, m in zip(got.flatten().tolist(), answer.flatten().tolist(), strict=True) if m]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    expected = [
        (v - mean) / std if m else 0.0 for v, m in zip(got.flatten().tolist(), answer.flatten().tolist(), strict=True)
    ]
    assert whole.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert abs(whole[answer.bool()].mean()) < 1e-6  # pooled over both parts, not per part


def test_no_critic_only_for_gae():
    assert advantages.uses_critic("gae")
    assert not any(advantages.uses_critic(e) for e in advantages.ESTIMATORS if e != "gae")


def test_group_estimators_refuse_single_answers():
    with pytest.raises(ValueError, match="n >= 2"):
        advantages.sequence_scores("grpo", torch.tensor([1.0, 2.0]), 1)


def test_constant_length_loss_sums_tokens_over_rows_times_length():
    adv = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = torch.zeros(2, 3)
    token_mean = ppo_math.actor_loss(logp, logp, adv, mask, 0.2)
    constant = ppo_math.actor_loss(logp, logp, adv, mask, 0.2, length=3)
    assert token_mean.item() == pytest.approx(-4.0 / 3)  # ratio 1: -(1 + 1 + 2) / 3 tokens
    assert constant.item() == pytest.approx(-4.0 / 6)  # -(1 + 1 + 2) / (2 rows x 3)
