"""From the reward model's end score to the reward PPO uses, and how much of it clipping flattens.

Upstream DeepSpeed-Chat clips the raw end score to ±`--clip_reward_value` (5). A reward model whose
scores all sit beyond that (a pretrained backbone's scores often do: around −5.5 for every answer)
gives every answer the same reward, and PPO learns nothing. The remedies, each a flag, all off by
default (upstream's behaviour):

- `--center_reward`: subtract the mean score the reward model gave its own training pairs, which
  step 2 measures and stores with the model (`reward_model.json`, `score_mean`);
- `--normalize_reward`: standardise scores by their running mean and standard deviation over the
  run (OpenRLHF's `--normalize_reward`);
- `--whiten_advantages`: whiten the advantages over each micro-batch's answer tokens (TRL's default).

Centring and normalisation act before the clip; the share of clipped scores is reported either way.
"""

from __future__ import annotations

import sys

import torch

# warn when more than this share of a step's scores were clipped
MOSTLY_CLIPPED = 0.5


class RunningMoments:
    """Running mean and variance of every score seen (all ranks), kept on the device: no host sync."""

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def update(self, scores: torch.Tensor) -> None:
        """Fold a batch of scores in (Chan et al.'s parallel update)."""
        from dschat_hal.runtime import all_reduce_mean, world_size

        scores = scores.detach().float()
        batch_mean = all_reduce_mean(scores.mean())
        batch_var = all_reduce_mean((scores - batch_mean).pow(2).mean())
        batch_count = float(scores.numel() * world_size())
        if self.mean is None:
            self.mean, self.var, self.count = batch_mean, batch_var, batch_count
            return
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * batch_count / total
        self.var = (
            self.var * self.count + batch_var * batch_count + delta.pow(2) * self.count * batch_count / total
        ) / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp(min=1e-8).sqrt()


class RewardShaper:
    """Turns raw end scores into the scores PPO clips: minus the stored training mean (`center`),
    then standardised by the running moments (`normalize`)."""

    def __init__(self, center: float | None = None, normalize: bool = False) -> None:
        self.center = center
        self.moments = RunningMoments() if normalize else None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.center is not None:
            scores = scores - self.center
        if self.moments is not None:
            self.moments.update(scores)
            scores = (scores - self.moments.mean) / self.moments.std
        return scores


def clipped_share(scores: torch.Tensor, clip_value: float) -> torch.Tensor:
    """The share of scores at or beyond ±`clip_value` (those the clip flattens)."""
    return (scores.float().abs() >= clip_value).float().mean()


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`values` shifted and scaled to mean 0 and variance 1 over the masked entries (TRL's masked_whiten)."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = ((values - mean).pow(2) * mask).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


class ClipWarning:
    """Says once per run, on stderr, that most rewards are being clipped, and what to do about it."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value, self.warned = clip_value, False

    def check(self, share: float, raw_mean: float) -> bool:
        """Warn (once) when `share` > MOSTLY_CLIPPED; True when it warned now."""
        if self.warned or share <= MOSTLY_CLIPPED:
            return False
        self.warned = True
        print(
            f"warning: {100 * share:.0f}% of rewards are clipped to ±{self.clip_value:g} (mean raw reward "
            f"{raw_mean:.2f}): clipped answers all get the same reward, so PPO learns little from them; "
            "centre the reward model (step 2 and 3 --center_reward), normalise rewards (--normalize_reward) "
            "or raise --clip_reward_value",
            file=sys.stderr,
            flush=True,
        )
        return True
