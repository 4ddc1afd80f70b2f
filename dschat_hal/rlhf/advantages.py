"""Critic-free advantage estimators of step 3 (GRPO, RLOO, REINFORCE++, ReMax) as small pure functions.

Index conventions as in `ppo_math`: `log_probs[:, t]` scores token `t + 1`, `start` is the first
position whose target is an answer token, `action_mask[:, t]` is 1 where token `t + 1` is a real
answer token. Rows are grouped by prompt: the `n` answers of a prompt are contiguous rows.

Every estimator's advantage at answer position t is one sequence-level score `b_i` put on the
answer's last token, plus the per-token KL penalties −kl_ctl·(log π − log π_ref), summed back to t
with the discount γ (OpenRLHF's cumulative returns; the KL stays in the reward, as in PPO):

    A_t = γ^(last − t) · b_i + Σ_{s ≥ t} γ^(s − t) · (−kl_ctl · KL_s)

- grpo: b_i = (r_i − mean of its group) / (std of its group + ε) (unbiased std, as verl and OpenRLHF);
  Dr. GRPO (`std_normalize=False`): b_i = r_i − mean of its group;
- rloo: b_i = r_i − mean of the other n − 1 rewards of its group;
- remax: b_i = r_i − the reward of the greedy answer to the same prompt;
- reinforce_pp (REINFORCE++): b_i = r_i, then the advantages whitened (mean 0, variance 1) over all
  answer tokens of the step's batch (`whiten_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dschat_hal.configs import ADVANTAGE_ESTIMATORS as ESTIMATORS  # noqa: F401  (the estimators, by name)
from dschat_hal.configs import uses_critic  # noqa: F401  (which of them need a critic)
from dschat_hal.rlhf import ppo_math

GROUP_ESTIMATORS = ("grpo", "rloo")  # need n >= 2 answers per prompt
GRPO_EPS = 1e-6


def sequence_scores(
    estimator: str,
    rewards: torch.Tensor,
    n: int,
    *,
    std_normalize: bool = True,
    baseline: torch.Tensor | None = None,
    eps: float = GRPO_EPS,
) -> torch.Tensor:
    """`b_i` of each row: its reward less the estimator's baseline (see the module docstring).
    `rewards`: one per row, groups of `n` contiguous rows; `baseline` (remax): one per row."""
    rewards = rewards.float()
    if estimator in GROUP_ESTIMATORS:
        if n < 2 or rewards.numel() % n:
            raise ValueError(f"{estimator} needs groups of n >= 2 answers, got {rewards.numel()} rows for n = {n}")
        groups = rewards.view(-1, n)
        centred = groups - groups.mean(-1, keepdim=True)
        if estimator == "rloo":  # r - (sum - r) / (n - 1) = (r - mean) * n / (n - 1)
            return (centred * (n / (n - 1))).reshape(-1)
        if std_normalize:
            centred = centred / (groups.std(-1, keepdim=True) + eps)
        return centred.reshape(-1)
    if estimator == "remax":
        if baseline is None:
            raise ValueError("remax needs the greedy answers' rewards as its baseline")
        return rewards - baseline.float()
    if estimator == "reinforce_pp":
        return rewards
    raise ValueError(f"no sequence scores for advantage estimator {estimator!r}")


def token_advantages(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    scores: torch.Tensor,
    action_mask: torch.Tensor,
    start: int,
    kl_ctl: float,
    gamma: float,
) -> torch.Tensor:
    """A_t over positions [start, T) (module docstring): `scores` (b_i, one per row) on each answer's
    last token plus the KL penalties, discounted back; zero outside the answer."""
    rewards = ppo_math.compute_rewards(log_probs, ref_log_probs, scores, action_mask, start, kl_ctl, math.inf)
    returns, _ = ppo_math.gae(torch.zeros_like(rewards), rewards, start, gamma, 1.0)  # values 0, λ 1: returns
    return returns * action_mask[:, start:]


def whiten_batch(
    values: list[torch.Tensor],
    masks: list[torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> list[torch.Tensor]:
    """`values` (tensors of any lengths) shifted and scaled to mean 0 and variance 1 over all their
    masked entries together (and over ranks, with `all_reduce`: a sum or mean over ranks, as only
    ratios of reduced numbers are used); zero where masked out."""
    masks = [m.to(v.dtype) for v, m in zip(values, masks, strict=True)]
    sums = torch.stack([sum((v * m).sum() for v, m in zip(values, masks, strict=True)), sum(m.sum() for m in masks)])
    if all_reduce is not None:
        sums = all_reduce(sums)
    count = sums[1].clamp(min=1)
    mean = sums[0] / count
    squares = sum(((v - mean).pow(2) * m).sum() for v, m in zip(values, masks, strict=True))
    squares = squares.reshape(1)
    if all_reduce is not None:
        squares = all_reduce(squares)
    scale = torch.rsqrt(squares[0] / count + eps)
    return [(v - mean) * scale * m for v, m in zip(values, masks, strict=True)]
