"""Step 3's evaluation (`--eval_interval`): the reward model's mean score of answers to held-out prompts."""

from __future__ import annotations

import torch

from dschat_hal.models.end_tokens import answer_end_ids
from dschat_hal.models.reward_model import score
from dschat_hal.rlhf import ppo_math


@torch.no_grad()
def mean_reward(trainer, loader, max_batches: int) -> float:
    """Generate answers to at most `max_batches` batches of `loader`'s prompts and return the mean
    end score the reward model gives them (averaged over ranks)."""
    from dschat_hal.runtime import all_reduce_mean

    backend, tokenizer = trainer.backend, trainer.tokenizer
    total, count = torch.zeros((), device=backend.device), 0
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        batch = backend.to_device(batch)
        prompts, prompt_mask = batch["prompt"], batch["prompt_att_mask"]
        seq = trainer.generate_sequence(prompts, prompt_mask)
        answers = ppo_math.answer_mask(seq[:, prompts.size(1) :], answer_end_ids(tokenizer), tokenizer.pad_token_id)
        mask = torch.cat([prompt_mask, answers], dim=1)
        backend.mark_step()
        scores = score(trainer.reward, seq, mask)["chosen_end_scores"].float()
        backend.mark_step()
        total, count = total + scores.sum(), count + scores.numel()
    return all_reduce_mean(total / max(count, 1)).item()
