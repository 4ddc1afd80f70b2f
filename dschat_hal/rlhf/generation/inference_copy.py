"""The actor's weights in the form generation computes with: LoRA adapters folded into their weights
for a block (the exact training weights back after it), and the ZeRO-3 inference copy, a plain hook-free
copy of the architecture refilled each phase by gathering the partitions (all at once or in groups of
layers, LoRA folded while copying), so decoding runs no per-token collectives."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from accel import Accelerator
from dschat_hal.models.lora import LoRALinear, lora_layers
from dschat_hal.models.lora_fold import FoldedWeight, fold_exactly, unfold_exactly


def is_partitioned(module: nn.Module) -> bool:
    """Whether `module`'s parameters are ZeRO-3 partitioned."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def folded_lora(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Fold LoRA adapters into their weights for the block; the exact training weights come back after,
    with no copy of the weights on the device (`lora_fold`: what the fold's rounding loses, on the host)."""
    layers = [layer for layer in lora_layers(module) if not layer.fused] if enabled else []
    folds: list[FoldedWeight] = []
    try:
        for layer in layers:
            folds.append(fold_exactly(layer))
        yield
    finally:
        for fold in folds:
            unfold_exactly(fold)


class InferenceCopy:
    """A plain, hook-free copy of a ZeRO-3 partitioned causal LM, refilled by gathering its partitions.

    LoRA layers of the source are folded (W + scaling·(AB)ᵀ) while copying, so the copy is the model
    the actor computes. Parameters are gathered in groups of `group_layers` transformer layers, or
    all at once (`group_layers=0`).
    """

    def __init__(self, source: nn.Module, backend: Accelerator, dtype: torch.dtype) -> None:
        self.source, self.backend, self.dtype = source, backend, dtype
        self.model: nn.Module | None = None
        self.gather_calls = 0  # GatheredParameters blocks entered (one collective round each)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.model is not None else 0

    def full_bytes(self) -> int:
        """Bytes of the gathered model (ZeRO-3 keeps the full shape in `ds_numel`)."""
        lora = {id(p) for layer in lora_layers(self.source) for p in (layer.lora_right_weight, layer.lora_left_weight)}
        sizes = (getattr(p, "ds_numel", p.numel()) for p in self.source.parameters() if id(p) not in lora)
        return sum(sizes) * torch.finfo(self.dtype).bits // 8

    def _build(self) -> nn.Module:
        from transformers.modeling_utils import no_init_weights

        with torch.device(self.backend.device), no_init_weights():
            model = type(self.source)._from_config(self.source.config, torch_dtype=self.dtype)
        model.tie_weights()  # skipped with the weight init: a tied head must not become a second copy
        model.eval().requires_grad_(False)
        for name, buffer in model.named_buffers():
            with contextlib.suppress(AttributeError):
                src = self.source.get_buffer(name)
                if src.shape == buffer.shape:
                    buffer.copy_(src)
        return model

    def groups(self, group_layers: int) -> list[list[str]]:
        """Parameter names of the copy, split into gather groups by transformer-layer index."""
        return _by_layer_group([name for name, _ in self.model.named_parameters()], group_layers)

    def gathered_bytes(self, group_layers: int) -> list[int]:
        """Bytes each gather group of the source (LoRA factors included) takes while gathered."""
        params = dict(self.source.named_parameters())
        return [
            sum(getattr(params[n], "ds_numel", params[n].numel()) * params[n].element_size() for n in names)
            for names in _by_layer_group(list(params), group_layers)
        ]

    @torch.no_grad()
    def refill(self, group_layers: int) -> nn.Module:
        """Gather the source's weights (folding LoRA) into the copy, group by group; returns the copy."""
        if self.model is None:
            self.model = self._build()
        for names in self.groups(group_layers):
            sources = [self._sources(name) for name in names]
            params = list({id(p): p for group in sources for p in group}.values())
            with self._gathered(params):
                self._store(names, dict(self.folded_values(names, sources)))
        return self.model

    def _gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """One collective round that makes `params` whole for the block."""
        import deepspeed

        self.gather_calls += 1
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def _store(self, names: list[str], full: dict[str, torch.Tensor]) -> None:
        """Copy one group's whole (folded) tensors into the copy."""
        for name in names:
            self.model.get_parameter(name).copy_(full[name])

    def folded_values(self, names: list[str], sources: list[list[nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, value) of each gathered source weight, with its LoRA delta folded in where it has one."""
        for name, (weight, *lora) in zip(names, sources, strict=True):
            value = weight.data
            if lora:
                value = value + self.source.get_submodule(name.rpartition(".")[0]).delta().to(value.dtype)
            yield name, value

    def _sources(self, name: str) -> list[nn.Parameter]:
        """The source parameter behind a copy parameter, with its LoRA factors when it has them."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.source.get_submodule(owner_name) if owner_name else self.source
        if isinstance(owner, LoRALinear) and leaf == "weight":
            return [owner.weight, owner.lora_right_weight, owner.lora_left_weight]
        return [getattr(owner, leaf)]

    def release(self) -> None:
        self.model = None
        self.backend.empty_cache()


def _by_layer_group(names: list[str], group_layers: int) -> list[list[str]]:
    """`names` split by transformer-layer index into groups of `group_layers` layers (one group: all)."""
    if group_layers <= 0:
        return [names]
    keyed: dict[object, list[str]] = {}
    for name in names:
        match = re.search(r"\.(\d+)\.", name)
        key = int(match.group(1)) // group_layers if match else "rest"
        keyed.setdefault(key, []).append(name)
    return list(keyed.values())
