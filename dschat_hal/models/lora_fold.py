"""Fold LoRA adapters into their weights in place, and restore the training weights bit for bit afterwards,
without a second copy of the weights on the device.

Floating-point addition does not invert: (W + Δ) − Δ ≠ W wherever rounding W + Δ lost low bits of W
(about 2% of the elements when |Δ| ≈ 1% of |W|, 11% at 10%, a third when they are alike). The fold keeps
exactly those elements (their flat position and original value) on the host; the unfold subtracts the
same Δ (recomputed from the unchanged LoRA factors: the same kernels on the same inputs) and writes them
back. Where they would take more than half the weight's bytes, the whole weight is kept on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dschat_hal.models.lora import LoRALinear

HOST = torch.device("cpu")


@dataclass
class FoldedWeight:
    """What restores one folded layer: the elements the fold's rounding lost (or the whole weight), on the host."""

    layer: LoRALinear
    index: torch.Tensor | None  # flat positions, int32/int64; None: `values` is the whole weight
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.values) if t is not None)


def fold_exactly(layer: LoRALinear) -> FoldedWeight:
    """W ← W + Δ in place (as `LoRALinear.fuse`), keeping on the host what `unfold_exactly` needs."""
    weight = layer.weight.data
    delta = layer.delta().to(weight.dtype)
    lost = (weight + delta).sub_(delta).ne_(weight).view(-1).nonzero().squeeze(1)
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    kept_bytes = lost.numel() * (torch.iinfo(index_dtype).bits // 8 + weight.element_size())
    if kept_bytes > weight.numel() * weight.element_size() // 2:
        folded = FoldedWeight(layer, None, weight.to(HOST, copy=True))
    else:
        folded = FoldedWeight(layer, lost.to(HOST, index_dtype), weight.view(-1)[lost].to(HOST))
    del lost
    weight.add_(delta)
    layer.fused = True
    return folded


def unfold_exactly(folded: FoldedWeight) -> None:
    """The training weight back, bit for bit."""
    layer = folded.layer
    weight = layer.weight.data
    if folded.index is None:
        weight.copy_(folded.values)
    else:
        weight.sub_(layer.delta().to(weight.dtype))
        weight.view(-1)[folded.index.to(weight.device)] = folded.values.to(weight.device)
    layer.fused = False
