"""Direct Preference Optimization (Rafailov et al. 2023), as upstream DeepSpeed-Chat's step-2 alternative
computes it: the policy's and the frozen reference's summed log-probabilities of each pair's answer tokens
(from the first token where chosen and rejected differ), then the sigmoid loss on the difference of their
log-ratios, with conservative DPO's label smoothing.

A pairwise batch holds the B chosen rows, then the B rejected rows (`dschat_hal.data.Collator`, phase 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dschat_hal.configs import DPOStepConfig
    from dschat_hal.decisions import Placement


def pair_label_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Which tokens of a pairwise batch (2B rows, chosen then rejected) are scored: each row's real tokens
    from the first position where the pair differs on (id of a real token, or one row's padding ends
    earlier). The shared prompt before it cancels in the log-ratio, so it is left out as upstream does;
    identical rows score every real token (upstream's divergence index 0)."""
    half = input_ids.shape[0] // 2
    mask = attention_mask.bool()
    differs = (input_ids[:half] != input_ids[half:]) | (mask[:half] != mask[half:])  # [B, T]
    seen = differs.cumsum(-1) > 0  # from the first difference on
    same = ~differs.any(-1, keepdim=True)
    keep = (seen | same).repeat(2, 1)
    return (mask & keep).to(attention_mask.dtype)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the masked tokens (token t scored by the logits at t-1):
    [N, T, V], [N, T], [N, T] -> [N]. Computed as gathered logit minus logsumexp (no [N, T, V] log-softmax kept)."""
    logits = logits[:, :-1]
    labels = input_ids[:, 1:].unsqueeze(-1)
    token_logps = logits.gather(-1, labels).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * label_mask[:, 1:].to(token_logps.dtype)).sum(-1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar: the batch mean
    chosen_rewards: torch.Tensor  # [B]: beta * (policy - reference) log-prob of the chosen answers
    rejected_rewards: torch.Tensor  # [B]: the same for the rejected answers


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """-(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ), Δ = (π_c - ref_c) - (π_r - ref_r), averaged over the pairs;
    the implicit rewards β·(π - ref) are returned detached, for the logs."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return DPOOutput(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def pair_logps(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor, fp32: bool = True):
    """(chosen, rejected) summed log-probs of a pairwise batch's forward; logits in fp32 when `fp32`."""
    logps = sequence_logps(logits.float() if fp32 else logits, input_ids, label_mask)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def reference_placement(config: DPOStepConfig) -> Placement:
    """Where the frozen reference lives, by step 3's rule for its reference (`dschat_hal.decisions`):
    replicated (ZeRO-0) unless the trained model is ZeRO-3, `--reference_zero_stage 3` or
    `--offload_reference_model` partition it (without a memory plan for DPO, a ZeRO-3 model's
    reference is partitioned, upstream's rule)."""
    from dschat_hal.decisions import Placement, placement_by_flags

    dpo = config.dpo
    placement = placement_by_flags(
        "reference", "actor", config.optim.zero_stage, dpo.reference_zero_stage, dpo.offload_reference_model
    )
    return placement or Placement(3, False, "ZeRO-3: the actor is ZeRO-3, as upstream")
