"""Low-rank adaptation of linear layers, fusable into the base weight for saving and generation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """`y = x W^T + b + scaling * x A B` with W frozen; `fuse()` folds A·B into W (and `unfuse` back)."""

    def __init__(self, base: nn.Linear, dim: int, scaling: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError("LoRA dimension must be positive")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # out_features, in_features (a ZeRO-3 partitioned weight keeps its full shape in ds_shape)
        rows, columns = getattr(self.weight, "ds_shape", self.weight.shape)
        self.lora_right_weight = nn.Parameter(torch.zeros(columns, dim, dtype=self.weight.dtype))
        self.lora_left_weight = nn.Parameter(torch.zeros(dim, rows, dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))  # left stays zero: starts as W
        self.lora_scaling = scaling / dim
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = False

    def delta(self) -> torch.Tensor:
        """scaling · (AB)ᵀ, the update folded into `weight`."""
        return (self.lora_right_weight @ self.lora_left_weight).t() * self.lora_scaling

    def fuse(self) -> None:
        if not self.fused:
            self.weight.data += self.delta().to(self.weight.dtype)
            self.fused = True

    def unfuse(self) -> None:
        if self.fused:
            self.weight.data -= self.delta().to(self.weight.dtype)
            self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.fused:
            return out
        return out + (self.lora_dropout(x) @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling


def convert_to_lora(
    model: nn.Module, part_module_name: str, dim: int, scaling: float = 1.0, dropout: float = 0.0
) -> int:
    """Replace every nn.Linear whose qualified name contains `part_module_name`; returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and part_module_name in n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), dim, scaling, dropout))
    if not names:
        from dschat_hal.errors import UserError

        raise UserError(
            f"--lora_module_name {part_module_name!r} matches no linear layer of the model; "
            "pick a substring of its layer names (e.g. 'decoder.layers.' for OPT, 'layers.' for llama, 'h.' for bloom)"
        )
    return len(names)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def only_optimize_lora(model: nn.Module, keep_trainable: tuple[str, ...] = ()) -> nn.Module:
    """Freeze everything but the LoRA factors and the parameters whose names start with one of
    `keep_trainable` (e.g. a reward model's freshly initialised `v_head.`)."""
    for name, param in model.named_parameters():
        lora = "lora_right_weight" in name or "lora_left_weight" in name
        param.requires_grad_(lora or name.startswith(keep_trainable))
    return model


def fuse_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.fuse()


def unfuse_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unfuse()


def strip_lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused model's state dict without the LoRA factors, loadable by the plain architecture."""
    return {k: v for k, v in state.items() if "lora_right_weight" not in k and "lora_left_weight" not in k}
