"""CUDA backend: torch's fused AdamW, nccl, bf16 on Ampere and newer, fp16 on Volta."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from accel._deepspeed import ds_accelerator
from accel.base import Accelerator
from accel.cpu import FusedAdamW

log = logging.getLogger(__name__)

# Calls of a captured decode step that may still fail in compilation or capture: the first compiles
# (dynamo traces, inductor builds), and CUDA graph trees warm up before they record, so the graph is
# recorded by a later call; past these, a failure is the step's own and is raised.
CAPTURE_CALLS = 3


class CudaAccelerator(Accelerator):
    name = "cuda"
    graph_kind = "CUDA graphs"
    dist_backend = "nccl"

    def __init__(self, local_rank: int | None = None) -> None:
        super().__init__(local_rank)
        self.graphs_fallback_reason = ""  # why the decode step decodes eager, once a capture failed

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
        """torch's `AdamW(fused=True)`: one kernel per step, nothing to build. `--optimizer deepspeed_fused`:
        DeepSpeed's FusedAdam (the same update), whose CUDA op a pip-installed DeepSpeed builds with nvcc
        on first use (without a CUDA toolkit: `MissingCUDAException`). `--offload`: DeepSpeedCPUAdam;
        `--no_fused_kernels`: torch's single-tensor AdamW."""
        from accel._op_builds import prepare_op_builds

        prepare_op_builds()  # DeepSpeed's Adam ops are built and loaded by torch's JIT
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam
        if not fused:
            return torch.optim.AdamW
        if self.optimizer_choice == "deepspeed_fused":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam
        return FusedAdamW

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
        """CUDA graphs through torch.compile (reduce-overhead's CUDA graphs, one capture per shape bucket),
        as one whole graph: `fullgraph=True` makes a graph break an error, and inductor is told to fail
        rather than skip the CUDA graph (`cudagraph_or_error`) instead of leaving part of the step out
        silently. A capture that fails falls back to eager, said in one line, for this and later steps."""
        if not self.use_graphs or self.graphs_fallback_reason:
            return step
        import torch._inductor.config as inductor_config

        options: dict[str, Any] = {"triton.cudagraphs": True}  # what mode="reduce-overhead" sets
        if hasattr(inductor_config.triton, "cudagraph_or_error"):  # not in every torch release
            options["triton.cudagraph_or_error"] = True
        compiled = self.graph_compile(step, fullgraph=True, dynamic=False, options=options)
        return _GuardedCapture(self, step, compiled)

    def graph_compile(self, step: torch.nn.Module, **kwargs: Any) -> Callable[..., Any]:
        """`torch.compile(step, **kwargs)`: the one call of `capture_decode_step` that needs the GPU (inductor's
        CUDA graphs); the CPU test double (`tests/fakes/cuda_on_cpu.py`) compiles for the CPU here instead."""
        return torch.compile(step, **kwargs)


class _GuardedCapture:
    """The captured decode step; its first `CAPTURE_CALLS` calls fall back to eager on a compile or
    capture failure (a compile error surfaces at the first call, not at torch.compile)."""

    def __init__(self, backend: CudaAccelerator, step: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        self.backend, self.step, self.compiled = backend, step, compiled
        self.guarded_calls = CAPTURE_CALLS
        self.eager = False

    def _replay(self, *args: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args).clone()  # the graph's output buffer is reused by the next replay

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.step(*args)
        if self.guarded_calls <= 0:
            return self._replay(*args)
        try:
            out = self._replay(*args)
        except Exception as err:  # noqa: BLE001 - dynamo, inductor and CUDA graph capture errors alike
            reason = _first_line(err)
            self.eager, self.backend.graphs_fallback_reason = True, reason  # later captures: eager at once
            log.warning("accel/cuda: the decode step does not capture as one CUDA graph (%s); it decodes eager", reason)
            return self.step(*args)
        self.guarded_calls -= 1
        return out


def _first_line(err: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, from the message's first two lines (dynamo's headline and its
    explanation), at most `limit` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {' - '.join(lines[:2])}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
