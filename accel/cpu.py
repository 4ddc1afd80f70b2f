"""CPU backend: torch's fused AdamW, gloo, bf16 or fp32, RSS as memory."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from accel._deepspeed import ds_accelerator
from accel.base import Accelerator

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags, Arm's "Features" entry


# DeepSpeed's print whenever a process loads its CPU communication op, built now or long ago
# (`deepspeed.comm.torch.build_shm_op`): once per rank, ahead of a step's own first line.
_OP_LOAD_NOTE = re.compile(r"DeepSpeed \S+ built successfully")


@contextlib.contextmanager
def _without_op_load_note() -> Iterator[None]:
    """Standard output of the block, less DeepSpeed's op-load note (a real build is announced by
    `accel._op_builds.announce_comm_op_build`); the other lines are written after the block."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [
            line for line in captured.getvalue().splitlines(keepends=True) if not _OP_LOAD_NOTE.fullmatch(line.strip())
        ]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()


@functools.cache
def native_bf16_flags() -> tuple[str, ...]:
    """The CPU's native-bf16 feature flags from /proc/cpuinfo (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            present = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in present)
    return ()


@functools.cache
def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (x86 `model name`, else the platform's processor)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() in ("model name", "Model"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu() -> str:
    """What a CPU figure depends on, for benchmark headers and RESULTS files: model, the vector level
    torch's kernels run at, and whether bf16 is native (what `--dtype auto` and DeepSpeed's shm kernel follow)."""
    flags = native_bf16_flags()
    bf16 = f"native bf16 ({', '.join(flags)})" if flags else "no native bf16"
    return f"{cpu_model_name()}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, {bf16}"


class FusedAdamW(torch.optim.AdamW):
    """torch's AdamW with its fused kernel (CPU and CUDA): the same update as `AdamW(foreach=False)`, one
    pass per tensor."""

    description = "torch.optim.AdamW(fused=True)"

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fused", True)
        super().__init__(params, *args, **kwargs)


class CpuAccelerator(Accelerator):
    name = "cpu"
    dist_backend = "gloo"
    # torch.compile backend of the decode step with device graphs on (the CPU has none): "eager" checks
    # that the step captures as one static graph, as CUDA graphs need, at little cost and no speed-up
    graph_compiler: str | Callable[..., Any] = "eager"

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        return ""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def memory_is_host_memory(self) -> bool:
        """Tensors live in host memory: the node's ranks share it."""
        return True

    def reuse_freed_host_memory(self) -> str:
        """Tensors live in host memory: keep freed large blocks for reuse (see accel/_host_memory.py)."""
        from accel._host_memory import keep_freed_host_memory

        return keep_freed_host_memory()

    def runtime_notes(self) -> str:
        from accel import _host_memory, _openmp

        return f"{torch.get_num_threads()} threads, OpenMP waits: {_openmp.choice}, host memory: {_host_memory.choice}"

    def init_distributed(self) -> None:
        """DeepSpeed's shared-memory all-reduce (its inference all-reduce on the CPU, which AutoTP's
                layers call) reads `LOCAL_SIZE`, which only DeepSpeed's launcher sets: without it every rank
                dies with SIGSEGV at the first all-reduce. torchrun sets `LOCAL_WORLD_SIZE`; copy it before
                DeepSpeed's communication starts (and, when DeepSpeed will compile its CPU communication op
        first, say so in one line: `accel._op_builds.announce_comm_op_build`). Then ZeRO's all-reduces and all-gathers take the same
                shared memory where safe (`accel/_shm_collectives.py`; `DSCHAT_HAL_SHM_COLLECTIVES=gloo`: not)."""
        import os

        if "LOCAL_WORLD_SIZE" in os.environ:
            os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])
        import deepspeed
        import torch.distributed as dist

        from accel import _op_builds

        loads_op = not dist.is_initialized() and deepspeed.ops.__compatible_ops__.get(_op_builds.SHM_COMM_OP, False)
        if loads_op:  # DeepSpeed builds it silently (minutes on a loaded machine): say so first
            _op_builds.prepare_op_builds()  # the environment's cache and ninja, as the load will use
            _op_builds.announce_comm_op_build()
        with _without_op_load_note():
            super().init_distributed()
        if loads_op and os.environ.get("LOCAL_RANK", "0") == "0":
            _op_builds.record_comm_op_build()
        unlink_shared_memory_buffer()
        if os.environ.get("DSCHAT_HAL_SHM_COLLECTIVES") != "gloo":
            from accel._shm_collectives import route_zero_collectives

            route_zero_collectives()

    def tensor_parallel_limit(self) -> int:
        """Every process is a CPU device: a group can hold all processes of the node."""
        from accel.base import local_process_count

        return local_process_count()

    def prepare_tensor_parallel(self, tp_size: int, world_size: int) -> None:
        """The shared-memory all-reduce always reduces over every rank of the node, whatever group it
        is given: a tensor-parallel group smaller than the world must use the process group's
        all-reduce instead (DeepSpeed falls back to it when the shm kernel level is 0)."""
        if tp_size < world_size:
            import deepspeed.comm.comm as ds_comm

            if ds_comm.cdb is not None and hasattr(ds_comm.cdb, "shm_vector_kernel_level"):
                ds_comm.cdb.shm_vector_kernel_level = 0

    def zero_overrides(self, stage: int) -> dict[str, Any]:
        """Gradients averaged by all-reduce, not reduce-scatter: gloo has no native reduce-scatter
        (measured, 2 processes, 32M bf16 elements: all-reduce 0.11 s, reduce-scatter 0.19 s), and
        ZeRO-3's reduce-scatter path first interleaves its bucket into a new buffer (`torch.cat`); a step-3
        PPO step's training phase under ZeRO-3 x2 (OPT-125m shape) went from ~17 s to ~12 s (loaded machine)."""
        return {"reduce_scatter": False} if stage > 0 else {}

    def optimizer_class(self, offload: bool = False, fused: bool = True) -> type[torch.optim.Optimizer]:
        """torch's fused CPU AdamW (`--no_fused_kernels`: the single-tensor AdamW).

        Parameters already live in host memory, so offload changes nothing. Measured on a 125M
        parameter set (benchmarks/RESULTS.md): fused 1.4 s a step, single-tensor 10.4 s,
        DeepSpeedCPUAdam 0.66 s but 11-13 s to load its op in every process even when cached,
        which the demo and the tests would pay on every run; measured again on a quieter machine,
        DeepSpeedCPUAdam 1.44 s vs fused 1.40 s, so it is not faster here either.
        """
        return FusedAdamW if fused else torch.optim.AdamW

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    @property
    def default_dtype(self) -> torch.dtype:
        """bf16 where the CPU computes it natively (AVX512-BF16, AMX, Arm BF16), fp32 elsewhere."""
        return torch.bfloat16 if native_bf16_flags() else torch.float32

    def default_dtype_reason(self) -> str:
        flags = native_bf16_flags()
        return f"the CPU has native bf16 ({', '.join(flags)})" if flags else "no native bf16 on this CPU"

    def synchronize(self) -> None:
        """CPU kernels run synchronously."""

    def memory_stats(self) -> dict[str, int]:
        ds = ds_accelerator(self.ds_name)
        return {"allocated": int(ds.memory_allocated()), "peak": int(ds.max_memory_allocated())}

    def capture_decode_step(self, step: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """With `use_graphs`: the decode step under torch.compile(fullgraph=True, dynamic=False), the
        capture CUDA graphs make (one graph per shape; a graph break or too many shapes is an error)."""
        if not self.use_graphs:
            return step
        return torch.compile(step, backend=self.graph_compiler, fullgraph=True, dynamic=False)


def shm_buffer_path(rank: int) -> str:
    """The file DeepSpeed's shared-memory all-reduce creates for `rank` (its shm.cpp's name)."""
    import os

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shared_memory_buffer() -> None:
    """DeepSpeed maps one 66 MB shared-memory workspace per rank at start-up and never unlinks it: every
    multi-process CPU run left its files in /dev/shm (host memory, until reboot). Once every rank has
    mapped every workspace (DeepSpeed's start-up returns only then; the barrier waits for all ranks),
    the names can go: the mappings stay valid and the memory is freed when the last process exits,
    killed or not."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier()
    try:
        os.unlink(shm_buffer_path(dist.get_rank()))
    except FileNotFoundError:  # not a node-local run, or the shm op is not built
        pass
