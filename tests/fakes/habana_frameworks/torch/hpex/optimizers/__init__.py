"""Fake `hpex.optimizers`: FusedAdamW is torch's AdamW that records its instances."""

from __future__ import annotations

import torch

instances: list[torch.optim.Optimizer] = []


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        instances.append(self)


def reset() -> None:
    instances.clear()
