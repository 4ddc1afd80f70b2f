"""The interface every backend implements; the only place device decisions are made.

Methods are grouped by concern, as in DeepSpeed's accelerator: device, graphs and shapes,
optimizers and precision, communication, RNG and memory, generation.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from accel.errors import DeviceUnavailableError, UnsupportedDtypeError  # noqa: F401  (both were defined here)

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Accelerator(abc.ABC):
    """One hardware backend. Callers ask it questions instead of checking device names."""

    name: str = ""  # "cpu" | "cuda" | "hpu"
    dist_backend: str = ""  # the collective library of this hardware: gloo | nccl | hccl
    graph_kind: str | None = None  # the device graphs `capture_decode_step` uses (None: it has none)

    def __init__(self, local_rank: int | None = None) -> None:
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_rank = max(local_rank, 0)
        self.bucket_sizes: tuple[int, ...] = ()  # empty: identity bucketing
        self.shape_audit: dict[str, set[tuple]] | None = None
        self.use_graphs = False  # capture generation in device graphs where the backend can
        self.optimizer_choice = "auto"  # --optimizer: "deepspeed_fused" where the backend offers it
        self.graph_counts: dict[str, int] | None = None  # device-graph captures and replays, where counted

    # ---- availability -------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """Whether this hardware can be used in this process."""

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str:
        """One line naming why the device cannot be used and what to do instead."""

    # ---- device placement ---------------------------------------------------------------
    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The torch device of this process (local-rank aware)."""

    def to_device(self, obj: Any, non_blocking: bool = False) -> Any:
        """Move a tensor, module, or (nested) dict/list/tuple of tensors to `device`."""
        if isinstance(obj, (torch.Tensor, torch.nn.Module)):
            return obj.to(self.device, non_blocking=non_blocking)
        if isinstance(obj, dict):
            return type(obj)((k, self.to_device(v, non_blocking)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.to_device(v, non_blocking) for v in obj)
        return obj

    # ---- graphs and static shapes ---------------------------------------------------------
    def mark_step(self) -> None:
        """Flush the lazily accumulated graph (HPU lazy mode); a no-op elsewhere."""

    @property
    def wants_static_shapes(self) -> bool:
        """Whether every step should see one of a few fixed shapes (graph-compiling devices)."""
        return False

    @property
    def graphs_by_default(self) -> bool:
        """Whether step-3 generation is captured in device graphs without being asked for (`use_graphs`
        then starts on; `--enable_device_graphs` asks where it does not)."""
        return False

    @property
    def static_generation_shapes(self) -> bool:
        """Whether step-3 generation must see fixed shapes: graph-compiling devices, and any device
        capturing the decode step in a device graph (`use_graphs`): each new shape is a new capture."""
        return self.wants_static_shapes or self.use_graphs

    def set_buckets(self, sizes: list[int] | tuple[int, ...] | None) -> None:
        """Configure length buckets; an empty list restores the backend default."""
        self.bucket_sizes = tuple(sorted(int(s) for s in sizes or ()))

    def bucket_length(self, n: int, maximum: int | None = None, static: bool | None = None) -> int:
        """The padded length for a sequence of length `n`.

        Identity unless buckets are configured or shapes are static (`static`, by default
        `wants_static_shapes`), in which case the smallest bucket >= n (or `maximum`, the static
        limit) is returned.
        """
        if self.bucket_sizes:
            for size in self.bucket_sizes:
                if size >= n:
                    return size if maximum is None else min(size, max(maximum, n))
            return max(n, maximum or n)
        if (self.wants_static_shapes if static is None else static) and maximum is not None:
            return max(n, maximum)
        return n

    @staticmethod
    def pad_to_static(
        tensor: torch.Tensor, dim: int, length: int, pad_value: float | int, left: bool = False
    ) -> torch.Tensor:
        """Pad `tensor` along `dim` to exactly `length` (never truncates)."""
        missing = length - tensor.size(dim)
        if missing < 0:
            raise ValueError(f"cannot pad a size-{tensor.size(dim)} dimension down to {length}")
        if missing == 0:
            return tensor
        pad_shape = list(tensor.shape)
        pad_shape[dim] = missing
        pad = tensor.new_full(pad_shape, pad_value)
        return torch.cat([pad, tensor] if left else [tensor, pad], dim=dim)

    def audit_shape(self, model_name: str, *tensors: torch.Tensor) -> None:
        """Record the input shapes a model saw (enabled by `enable_shape_audit`)."""
        if self.shape_audit is not None:
            shapes = tuple(tuple(t.shape) for t in tensors if t is not None)
            self.shape_audit.setdefault(model_name, set()).add(shapes)

    def enable_shape_audit(self) -> dict[str, set[tuple]]:
        self.shape_audit = {}
        return self.shape_audit

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Device-specific model preparation before DeepSpeed wraps it (e.g. graph compilation)."""
        return model

    # ---- optimizers and precision ---------------------------------------------------------
    @abc.abstractmethod
    def optimizer_class(self, offload: bool = False, fused: bool = True) -> type[torch.optim.Optimizer]:
        """The Adam(W) class to use: fused kernels where they exist, a CPU kernel with offload."""

    def describe_optimizer(self, offload: bool = False, fused: bool = True) -> str:
        """The name of what `optimizer_class` picks (with `optimizer_choice` as set), for the start-up line."""
        cls = self.optimizer_class(offload=offload, fused=fused)
        return getattr(cls, "description", f"{cls.__module__}.{cls.__qualname__}")

    def compute_fp32_loss(self, model_type: str, user_flag: bool | None = None) -> bool:
        """Whether the LM loss should be computed in fp32. A user flag always wins."""
        return bool(user_flag)

    @staticmethod
    def lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool) -> torch.Tensor:
        """Causal-LM cross entropy (shifted), ignoring -100 labels, optionally in fp32."""
        logits = logits[..., :-1, :]
        if fp32:
            logits = logits.float()
        labels = labels[..., 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)

    @property
    @abc.abstractmethod
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes training may use on this device."""

    @property
    @abc.abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The dtype used when the user does not choose one."""

    def default_dtype_reason(self) -> str:
        """Why `default_dtype` is what it is, for the start-up line."""
        return f"{self.name}'s default"

    def resolve_dtype(self, name: str | None) -> torch.dtype:
        """Map `fp32|bf16|fp16` (or None for the default) to a supported torch dtype."""
        if name is None or name == "auto":
            return self.default_dtype
        if name not in DTYPE_NAMES:
            raise UnsupportedDtypeError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[name]
        if dtype not in self.supported_dtypes:
            supported = ", ".join(k for k, v in DTYPE_NAMES.items() if v in self.supported_dtypes)
            raise UnsupportedDtypeError(
                f"--dtype {name} is not supported on {self.describe()}; use one of: {supported}"
            )
        return dtype

    # ---- communication ---------------------------------------------------------------------
    @property
    def ds_name(self) -> str:
        """The DS_ACCELERATOR value DeepSpeed must agree with."""
        return self.name

    def comm_backend(self) -> str:
        """The backend `init_distributed` actually uses (the hardware's, unless simulated)."""
        return self.dist_backend

    def reuse_freed_host_memory(self) -> str | None:
        """Keep freed large host blocks for reuse where tensors live in host memory (the CPU backend);
        `accel.release_host_memory()` undoes it. None where the backend leaves the allocator alone."""
        return None

    def zero_overrides(self, stage: int) -> dict[str, Any]:
        """Entries this hardware needs in DeepSpeed's `zero_optimization` section for ZeRO `stage`."""
        return {}

    def device_count(self) -> int:
        """Devices of this kind on this node (the hpZ partition size across nodes)."""
        return 1

    def tensor_parallel_limit(self) -> int:
        """The largest tensor-parallel group this node can hold: its devices, and no more than the
        processes started on it (`LOCAL_WORLD_SIZE`, or DeepSpeed's `LOCAL_SIZE`)."""
        return min(self.device_count(), local_process_count())

    def prepare_tensor_parallel(self, tp_size: int, world_size: int) -> None:
        """Make DeepSpeed's inference all-reduce honour a tensor-parallel group of `tp_size` ranks
        (nothing to do where it always uses the group it is given)."""

    @property
    def supports_quantized_weights(self) -> bool:
        """Whether ZeRO++ weight quantisation (`--enable_mixed_precision_lora`) has kernels here."""
        return False

    def init_distributed(self) -> None:
        """Initialise torch.distributed through DeepSpeed: under a launcher (torchrun, deepspeed)
        from its environment, or as a world of one without one — without exporting RANK or
        MASTER_PORT, so that child processes never inherit this process's rendezvous. First, the
        environment's op cache and ninja are chosen (`accel/_op_builds.py`: one build per environment) and,
        once per process, a stale op-build lock (a killed build's) is removed, said in one line: DeepSpeed loads
        its communication op here, and torch would wait on that lock forever, silently. DeepSpeed is made
        to agree with this backend (`ds_name`) even when it was imported, and chose, before it."""
        import deepspeed
        import torch.distributed as dist

        from accel._deepspeed import ds_accelerator
        from accel._op_builds import prepare_op_builds

        ds_accelerator(self.ds_name)
        prepare_op_builds()
        if dist.is_available() and dist.is_initialized():
            return
        self.set_device()
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            deepspeed.init_distributed(self.comm_backend(), dist_init_required=True)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it; harmless to children
            deepspeed.init_distributed(
                self.comm_backend(),
                auto_mpi_discovery=False,
                dist_init_required=True,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
        _destroy_process_group_at_exit_once()

    def set_device(self) -> None:
        """Bind this process to its local device (no-op where there is one device)."""

    # ---- RNG, memory, timing -----------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all queued device work."""

    @abc.abstractmethod
    def memory_stats(self) -> dict[str, int]:
        """`allocated` and `peak` bytes (process RSS on the CPU)."""

    def empty_cache(self) -> None:
        """Return cached allocator memory to the device."""

    def available_memory(self) -> int | None:
        """Bytes still free on this process's device (None when unknown); host memory where the device
        is the host (`memory_is_host_memory`), which all ranks on the host share: see `rank_memory`."""
        import psutil

        return int(psutil.virtual_memory().available)

    @property
    def memory_is_host_memory(self) -> bool:
        """Whether this backend's device memory is the host's, shared by every rank on the host."""
        return False

    def rank_memory(self, ranks_on_host: int | None = None) -> int | None:
        """Bytes one rank may still allocate: its device's free memory; where that is host memory, the
        host's available memory divided by the ranks on this host (`ranks_on_host`, default this job's
        processes here: `local_process_count()`). None when unknown."""
        free = self.available_memory()
        if free is None or not self.memory_is_host_memory:
            return free
        return int(free // max(1, ranks_on_host or local_process_count()))

    # ---- generation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def generation_context(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Device bookkeeping around a generation phase (e.g. flushing a lazy graph)."""
        yield model

    def generate_kwargs(self, graphs: bool = False) -> dict[str, Any]:
        """Extra keyword arguments this device's HF `generate` needs; `graphs`: the model's forward is the
        one `capture_generate_forward` returned."""
        return {}

    def capture_generate_forward(self, model: torch.nn.Module) -> Callable[..., Any] | None:
        """For a generation phase run by the model's own `generate` (where the hybrid engine's decode step
        cannot serve the model): a function to stand in for `model.forward` for that phase only, which
        captures it in device graphs, one per input shape (`use_graphs`). None where the backend does
        not capture that way. The caller keeps it for later phases and puts the forward back after each."""
        return None

    def capture_decode_step(self, step: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """The hybrid engine's per-token decode step, captured in a device graph where the backend can
        (`use_graphs`); plain elsewhere. Only this generation-only module is ever captured."""
        return step

    # ---- description ------------------------------------------------------------------------
    def describe(self) -> str:
        return f"{self.name} ({self.device})"

    def runtime_notes(self) -> str:
        """What else about the backend's runtime the start-up line should say ("" for nothing)."""
        return ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def local_process_count() -> int:
    """Processes of this job on this node, as the launcher says (1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _destroy_process_group_at_exit_once() -> None:
    """Destroy the process group while the interpreter is still whole: left to interpreter shutdown,
    gloo's worker threads can still hold tensors and abort the process ("terminate called without an
    active exception", SIGABRT) after a run that succeeded."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # best effort: the process is leaving either way
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
