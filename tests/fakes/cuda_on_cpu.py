"""The CUDA backend on the CPU: a test double of `accel.cuda.CudaAccelerator` for runs of the steps here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.testing import CompileCounter

from accel.base import Accelerator
from accel.cuda import CudaAccelerator


class CudaOnCpu(CudaAccelerator):
    """The real CUDA backend with only what needs an NVIDIA GPU replaced, so that a step run with `--device cuda`
    here takes every decision `accel/cuda.py` makes: its optimizer (`optimizer_class`), dtypes (fp32, fp16 and
    bf16 as on an Ampere or newer GPU unless `bf16=False`: a V100), ZeRO entries, quantised-weight support, and
    the decode step's capture (`capture_decode_step`: whole-graph torch.compile, replays, the eager fallback).

    Replaced: it is available (`is_available`); the device is the CPU (`device`); `set_device`, `synchronize`, `empty_cache` do nothing;
    `device_count` is 1; `manual_seed` seeds the host generators only; `_bf16_ok` is the constructor's `bf16`;
    `available_memory` is the host's; DeepSpeed runs its CPU accelerator (`ds_name`, which `memory_stats` also
    reads) over gloo (`comm_backend`, not nccl); and `graph_compile`, the call that would build inductor's CUDA
    graphs, compiles for the CPU with a counting backend, recording its arguments (`compile_calls`), the graphs
    compiled (`compiler.frame_count`) and the calls of each compiled step (`replays`).

    Not here: `--dtype fp16`, which the CUDA backend offers but DeepSpeed's CPU accelerator refuses ("Type fp16
    is not supported on your device"), and what only a GPU shows (inductor's kernels, the CUDA graphs themselves,
    nccl): `example_scripts/validate_gpu.sh` checks those on an NVIDIA machine."""

    def __init__(self, local_rank: int | None = None, bf16: bool = True) -> None:
        super().__init__(local_rank)
        self.bf16 = bf16
        self.compile_calls: list[dict[str, Any]] = []
        self.compiler = CompileCounter()
        self.replays = 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def set_device(self) -> None:
        """One CPU: nothing to bind."""

    def device_count(self) -> int:
        return 1

    def _bf16_ok(self) -> bool:
        return self.bf16

    def manual_seed(self, seed: int) -> None:
        Accelerator.manual_seed(self, seed)  # Python, NumPy and torch's CPU generator; no CUDA generator here

    def synchronize(self) -> None:
        """CPU kernels run synchronously."""

    def empty_cache(self) -> None:
        """No device allocator to empty."""

    def available_memory(self) -> int | None:
        return Accelerator.available_memory(self)  # the host's available memory

    @property
    def ds_name(self) -> str:
        return "cpu"

    def comm_backend(self) -> str:
        return "gloo"

    def graph_compile(self, step: torch.nn.Module, **kwargs: Any) -> Callable[..., Any]:
        """torch.compile with the CUDA backend's arguments recorded and its graph (`fullgraph`, `dynamic`) kept;
        compiled by a counting backend that runs the graph eagerly (inductor's `options` are for the GPU)."""
        self.compile_calls.append(kwargs)
        compiled = torch.compile(
            step, backend=self.compiler, fullgraph=kwargs.get("fullgraph", False), dynamic=kwargs.get("dynamic")
        )

        def replay(*args: Any) -> Any:
            self.replays += 1
            return compiled(*args)

        return replay
