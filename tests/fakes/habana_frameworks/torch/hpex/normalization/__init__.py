"""Stand-in of `hpex.normalization`: FusedRMSNorm as the RMSNorm it fuses (optimum-habana uses it on
HPU tensors only)."""

from __future__ import annotations

import torch


class FusedRMSNorm:
    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return weight * (hidden.float() * torch.rsqrt(variance + eps)).to(hidden.dtype)


class FusedClipNorm:
    def __init__(self, parameters, max_norm: float) -> None:
        self.parameters, self.max_norm = list(parameters), max_norm

    def clip_norm(self, parameters) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_norm)
