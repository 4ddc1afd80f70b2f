"""CPU backend: torch AdamW, gloo, bf16 or fp32, RSS as memory."""

from __future__ import annotations

import torch

from accel._deepspeed import ds_accelerator
from accel.base import Accelerator


class CpuAccelerator(Accelerator):
    name = "cpu"
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        return ""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def optimizer_class(self, offload: bool = False, fused: bool = True) -> type[torch.optim.Optimizer]:
        # Parameters already live in host memory: offload changes nothing, and torch's AdamW
        # avoids DeepSpeedCPUAdam's JIT build (the engine allows it via zero_force_ds_cpu_optimizer).
        return torch.optim.AdamW

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def synchronize(self) -> None:
        """CPU kernels run synchronously."""

    def memory_stats(self) -> dict[str, int]:
        ds = ds_accelerator(self.ds_name)
        return {"allocated": int(ds.memory_allocated()), "peak": int(ds.max_memory_allocated())}
