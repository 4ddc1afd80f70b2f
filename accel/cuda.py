"""CUDA backend: DeepSpeed FusedAdam, nccl, bf16 on Ampere and newer, fp16 on Volta."""

from __future__ import annotations

from collections.abc import Callable

import torch

from accel._deepspeed import ds_accelerator
from accel.base import Accelerator


class CudaAccelerator(Accelerator):
    name = "cuda"
    graph_kind = "CUDA graphs"
    dist_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        return "CUDA requested but torch.cuda.is_available() is False; run on an NVIDIA GPU with a CUDA build of torch or use --device cpu"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank)

    def set_device(self) -> None:
        torch.cuda.set_device(self.device)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    @property
    def supports_quantized_weights(self) -> bool:
        return True  # DeepSpeed's ZeRO++ quantiser kernels

    def optimizer_class(self, offload: bool = False, fused: bool = True) -> type[torch.optim.Optimizer]:
        from accel._op_builds import clear_stale_build_locks_once

        clear_stale_build_locks_once()  # DeepSpeed's Adam ops are built and loaded by torch's JIT
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam
        if fused:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam
        return torch.optim.AdamW

    def _bf16_ok(self) -> bool:
        return torch.cuda.is_bf16_supported()

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        base = (torch.float32, torch.float16)
        return base + (torch.bfloat16,) if self._bf16_ok() else base

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self._bf16_ok() else torch.float16  # A100/H100 vs V100

    def manual_seed(self, seed: int) -> None:
        super().manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory_stats(self) -> dict[str, int]:
        ds = ds_accelerator(self.ds_name)
        return {"allocated": int(ds.memory_allocated()), "peak": int(ds.max_memory_allocated())}

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def available_memory(self) -> int | None:
        """Free on the device plus what torch's allocator holds unused (reusable without a new cudaMalloc)."""
        free, _total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + held)

    def capture_decode_step(self, step: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """CUDA graphs through torch.compile's reduce-overhead mode (one capture per shape bucket)."""
        if not self.use_graphs:
            return step
        compiled = torch.compile(step, mode="reduce-overhead", dynamic=False)

        def replay(*args: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args).clone()  # the graph's output buffer is reused by the next replay

        return replay
