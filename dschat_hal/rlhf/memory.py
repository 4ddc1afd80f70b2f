"""What a hybrid-engine generation phase allocates on the device, and whether it fits.

A phase first fills the inference copy (ZeRO-3: gathering all parameters at once, or one group of layers
at a time, freed after the copy), then decodes into a static KV cache. So the peak above what is already
allocated is the new copy plus the larger of the gathered parameters and the new KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dschat_hal.errors import UserError

MB = 2**20
HEADROOM = 0.8  # all at once only with a fifth of the free memory to spare (activations, fragmentation)


def kv_cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache for `batch` rows of `length` positions (keys and values of every layer,
    grouped-query models counted by their KV heads)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * batch * kv_heads * head_dim * length * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class PhaseMemory:
    """Device bytes a generation phase needs beyond what is allocated (each 0 when already allocated)."""

    copy: int  # the ZeRO-3 inference copy
    gathered: int  # every parameter gathered at once
    group: int  # the largest group of layers gathered (--tp_gather_partition_size)
    kv_cache: int  # the static KV cache of this batch
    shape: tuple[int, int]  # (batch rows, positions) of that cache

    def all_at_once(self) -> int:
        return self.copy + max(self.gathered, self.kv_cache)

    def grouped(self) -> int:
        return self.copy + max(self.group, self.kv_cache)

    def group_layers(self, free: int | None, group_layers: int, zero3: bool) -> int:
        """0 (gather all at once) or `group_layers`; a UserError, before anything is allocated, when even
        layer groups do not fit in `free` bytes (None: unknown, never refused)."""
        if free is None:
            return 0
        if self.all_at_once() < HEADROOM * free:
            return 0
        if self.grouped() < free:
            return group_layers if zero3 else 0
        raise UserError(self.refusal(free, zero3))

    def refusal(self, free: int, zero3: bool) -> str:
        """The one line naming the sizes and the flags that free device memory at generation time."""
        rows, positions = self.shape
        parts = [f"KV cache {_mb(self.kv_cache)} for {rows} rows x {positions} positions"]
        if zero3:
            parts[:0] = [f"inference copy {_mb(self.copy)}", f"largest gathered layer group {_mb(self.group)}"]
        # what frees memory at generation time (--unpin_actor_parameters and --release_inference_cache
        # free the copy and cache between phases, for training: no help here)
        helps = ["a smaller --per_device_generation_batch_size or --max_answer_seq_len"]
        if zero3 and self.group >= self.kv_cache:
            helps[:0] = ["a smaller --tp_gather_partition_size"]
        helps += ["--offload_reference_model, --offload_reward_model or --offload", "--inference_tp_size N"]
        return (
            f"hybrid engine: generation needs {_mb(self.grouped())} on the device ({', '.join(parts)}) but "
            f"{_mb(free)} is free; try {', '.join(helps)}"
        )


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:.0f} MB" if nbytes >= 10 * MB else f"{nbytes / MB:.2f} MB"
