"""PPO maths of step 3 as small pure functions over (batch, time) tensors.

Index conventions (as in DeepSpeed-Chat): `log_probs[:, t]` scores token `t + 1`; `start` is
`prompt_length - 1`, the first position whose target is an answer token; `action_mask[:, t]` is 1
where token `t + 1` is a real answer token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under `logits` (computed in fp32)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def answer_mask(answers: torch.Tensor, eos_id: int | list[int], pad_id: int) -> torch.Tensor:
    """1 for the answer's tokens up to and including its first end token (`eos_id`: one id or a
    list, e.g. EOS and an end of turn); 0 after it and for padding. A pad that is also an end id
    (pad = eos) is kept as the answer's end."""
    ends = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    is_stop = answers.new_tensor(ends).view(-1, 1, 1).eq(answers).any(0)
    is_end = is_stop | (answers == pad_id)
    ended_before = (is_end.long().cumsum(-1) - is_end.long()) > 0
    keep = ~ended_before
    if pad_id not in ends:
        keep &= answers != pad_id
    return keep.long()


def compute_rewards(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    reward_score: torch.Tensor,
    action_mask: torch.Tensor,
    start: int,
    kl_ctl: float,
    clip_reward_value: float,
) -> torch.Tensor:
    """Per-token −kl_ctl·(log π − log π_ref), plus the clipped end score on the last answer token.

    Zero outside the answer (before `start` and after its end).
    """
    rewards = -kl_ctl * (log_probs - ref_log_probs)
    answer_len = action_mask[:, start:].sum(-1)
    last = (start + answer_len - 1).clamp(min=start).unsqueeze(-1)
    clipped = reward_score.float().clamp(-clip_reward_value, clip_reward_value).unsqueeze(-1)
    rewards = rewards.scatter_add(-1, last, clipped.to(rewards.dtype))
    positions = torch.arange(rewards.size(-1), device=rewards.device)
    return rewards * action_mask * (positions >= start)


def gae(
    values: torch.Tensor, rewards: torch.Tensor, start: int, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over positions [start, T); returns (advantages, returns).

    Values and rewards must already be zero after each answer's end. Computed as one matrix
    product with the discount matrix (γλ)^(s−t), s ≥ t — no per-token host loop.
    """
    values, rewards = values[:, start:].float(), rewards[:, start:].float()
    length = values.size(-1)
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.size(0), 1)], dim=-1)
    deltas = rewards + gamma * next_values - values
    t = torch.arange(length, device=values.device)
    exponent = (t.unsqueeze(0) - t.unsqueeze(1)).float()  # s - t
    discount = torch.where(exponent >= 0, (gamma * lam) ** exponent.clamp(min=0), torch.zeros_like(exponent))
    advantages = deltas @ discount.t()
    return advantages, advantages + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_mean(losses: torch.Tensor, mask: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Per-token `losses` averaged over the masked tokens; with `length`, summed and divided by
    rows × `length` (Dr. GRPO's constant-length average: no bias towards short or long answers)."""
    if length is not None:
        return (losses * mask.to(losses.dtype)).sum() / (mask.size(0) * length)
    return masked_mean(losses, mask)


def actor_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    length: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clipped surrogate objective (a loss: lower is better), averaged over answer tokens as
    `token_mean` does; `weights` (per token, no gradient), when given, scale each token's clipped loss
    (truncated importance sampling: `truncated_is_weights`)."""
    ratio = torch.exp((log_probs - old_log_probs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    losses = torch.max(unclipped, clipped)
    if weights is not None:
        losses = losses * weights
    return token_mean(losses, mask, length)


KL_ESTIMATORS = ("k1", "k2", "k3")


def approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman's estimators,
    signs and clamps as OpenRLHF's `compute_approx_kl` and verl's `kl_penalty`), in fp32. With
    r = π_ref / π: k1 = −log r = log π − log π_ref; k2 = (log r)² / 2; k3 = r − 1 − log r (log r
    clamped to ±20 before the exp, as verl's low_var_kl). Every estimate is clamped to ±10."""
    log_ratio = log_probs.float() - ref_log_probs.float()  # log π − log π_ref = −log r
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio.pow(2) / 2
    elif estimator == "k3":
        log_r = (-log_ratio).clamp(-20.0, 20.0)
        kl = log_r.exp() - 1 - log_r
    else:
        raise ValueError(f"unknown KL estimator {estimator!r} (one of {', '.join(KL_ESTIMATORS)})")
    return kl.clamp(-10.0, 10.0)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str,
    length: int | None = None,
) -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO's placement, verl's `use_kl_loss`): `approx_kl`
    averaged over answer tokens as the policy loss is (`token_mean`); gradients flow through
    `log_probs`."""
    return token_mean(approx_kl(log_probs, ref_log_probs, estimator), mask, length)


MISMATCH_BAND = (0.9, 1.1)


def rollout_ratio(log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> torch.Tensor:
    """exp(log p_train − log p_rollout) per token, in fp32, no gradient: how much more (or less)
    likely the training forward finds each sampled token than the engine that sampled it did."""
    return torch.exp(log_probs.detach().float() - rollout_log_probs.float())


def mismatch_share(
    log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    band: tuple[float, float] = MISMATCH_BAND,
) -> torch.Tensor:
    """The share of masked tokens whose training/rollout probability ratio lies outside `band`."""
    ratio = rollout_ratio(log_probs, rollout_log_probs)
    outside = (ratio < band[0]) | (ratio > band[1])
    return masked_mean(outside.float(), mask)


def truncated_is_weights(log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights min(p_train / p_rollout, `cap`) per token, detached
    (verl's TIS): they correct the policy loss for sampling with a slightly different distribution."""
    return rollout_ratio(log_probs, rollout_log_probs).clamp(max=cap)


def critic_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> torch.Tensor:
    """0.5 · max of the unclipped and clipped squared errors, masked mean."""
    values = values.float()
    clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al.'s controller: nudges kl_ctl so the measured KL tracks `target`."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(min(current_kl / self.target - 1.0, 0.2), -0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
