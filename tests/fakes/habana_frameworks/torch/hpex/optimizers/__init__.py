"""Fake `hpex.optimizers`: FusedAdamW is torch's AdamW with Habana's own defaults (eps 1e-6,
weight decay 0.0, as `habana_frameworks.torch.hpex.optimizers.FusedAdamW` declares them), recording
its instances."""

from __future__ import annotations

import torch

instances: list[torch.optim.Optimizer] = []


class FusedAdamW(torch.optim.AdamW):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        moments_dtype=None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        instances.append(self)


def reset() -> None:
    instances.clear()
