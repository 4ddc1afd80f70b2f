"""DeepSpeed configurations for trained engines (actor, critic, SFT, RM) and inference-only ones."""

from __future__ import annotations

import os
from typing import Any

import torch

from accel import Accelerator


def _precision(dtype: torch.dtype) -> dict[str, Any]:
    if dtype == torch.bfloat16:
        return {"bf16": {"enabled": True}}
    if dtype == torch.float16:
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 12}}
    return {}


# ZeRO 1-2 step one optimizer group at a time (DeepSpeed's `stage_1_and_2.step`): the group's gradients
# flattened, then copied to fp32 (6 bytes per parameter in 16 bits), stepped and freed. With one large group
# that copy is the whole model's: split in STEP_CHUNKS, it is a quarter (measured on the CPU: the step's
# peak above the resident states 8.7 -> 1.4-1.9 bytes per parameter for a 92M OPT, benchmarks/RESULTS_memory.md).
STEP_CHUNKS = 4
STEP_CHUNK_MIN_ELEMENTS = 10_000_000  # smaller groups stay whole
STEP_CHUNKS_ENV = "DSCHAT_HAL_STEP_CHUNKS"  # 1: whole groups, as checkpoints written before the split hold them


def step_chunks() -> int:
    """Groups a large optimizer group is split into: `DSCHAT_HAL_STEP_CHUNKS` where set (1 = whole), else 4."""
    value = os.environ.get(STEP_CHUNKS_ENV, "").strip()
    if not value:
        return STEP_CHUNKS
    if not value.isdigit() or int(value) < 1:
        from dschat_hal.errors import UserError

        raise UserError(f"{STEP_CHUNKS_ENV}={value!r}: give a whole number >= 1 (1 keeps optimizer groups whole)")
    return int(value)


def split_for_step(
    groups: list[dict[str, Any]], parts: int | None = None, min_elements: int | None = None
) -> list[dict[str, Any]]:
    """Each optimizer group of more than `min_elements` elements as up to `parts` (`step_chunks()`) groups of
    consecutive parameters with its settings. The update is the same up to the last bit of the clipping
    norm: AdamW is per element, and DeepSpeed clips by the norm over all groups, summed group by group."""
    parts = step_chunks() if parts is None else parts
    min_elements = STEP_CHUNK_MIN_ELEMENTS if min_elements is None else min_elements
    split = []
    for group in groups:
        total = sum(p.numel() for p in group["params"])
        if total <= min_elements or parts < 2:
            split.append(group)
            continue
        chunks: list[list] = [[]]
        done = 0
        for param in group["params"]:
            if chunks[-1] and len(chunks) < parts and done >= total * len(chunks) / parts:
                chunks.append([])
            chunks[-1].append(param)
            done += param.numel()
        split.extend({**group, "params": chunk} for chunk in chunks)
    return split


def step_chunk(trainable: float, stage: int, offload: bool, largest_param: float = 0.0) -> float:
    """Elements of the largest group a ZeRO 1-2 step copies at once, as the memory plan counts it: a
    quarter of the trained parameters (`split_for_step` splits at parameter boundaries, so at least the
    largest parameter), or all of them where nothing is split."""
    if stage in (1, 2) and not offload and trainable > STEP_CHUNK_MIN_ELEMENTS:
        return min(trainable, max(trainable / step_chunks(), largest_param))
    return trainable


def train_ds_config(
    accelerator: Accelerator,
    dtype: torch.dtype,
    stage: int,
    offload: bool,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    tensorboard_path: str | None = None,
    job_name: str = "train",
) -> dict[str, Any]:
    """ZeRO `stage` training config (upstream DeepSpeed-Chat's values), with optional CPU offload."""
    zero = {
        "stage": stage,
        "offload_param": {"device": "cpu" if offload and stage == 3 else "none"},
        "offload_optimizer": {"device": "cpu" if offload else "none"},
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": False,
        **accelerator.zero_overrides(stage),
    }
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        **_precision(dtype),
    }
    if tensorboard_path:
        config["tensorboard"] = {
            "enabled": True,
            "output_path": f"{tensorboard_path}/ds_tensorboard_logs/",
            "job_name": f"{job_name}_tensorboard",
        }
    return config


def hpz_entries(accelerator: Accelerator, stage: int, world_size: int) -> dict[str, Any]:
    """ZeRO++ hierarchical partitioning (`--zero_hpz_enabled`): under ZeRO-3 across nodes, a secondary
    copy of the weights partitioned within each node, so forward/backward all-gathers stay on the node.
    Empty where it cannot help (another stage, or one node)."""
    per_node = accelerator.device_count()
    if stage != 3 or per_node < 2 or world_size <= per_node or world_size % per_node:
        return {}
    return {"zero_hpz_partition_size": per_node}


def eval_ds_config(
    accelerator: Accelerator, dtype: torch.dtype, stage: int, offload: bool, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """Config for models that only run forward (reference, reward): ZeRO-3 (`offload`: parameters in
    host memory) or plain replication; `dschat_hal.decisions` decides which."""
    return {
        "train_batch_size": micro_batch * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "steps_per_print": 10**9,
        "zero_optimization": {
            "stage": 3 if stage == 3 else 0,
            "stage3_param_persistence_threshold": 1e4,
            "offload_param": {"device": "cpu" if offload and stage == 3 else "none"},
            "memory_efficient_linear": False,
            **accelerator.zero_overrides(3 if stage == 3 else 0),
        },
        "wall_clock_breakdown": False,
        **_precision(dtype),
    }
