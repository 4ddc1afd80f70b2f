"""Hardware abstraction layer: `accel.get("auto"|"cpu"|"cuda"|"hpu")` returns the backend.

The layer is the only code in the project that names a device. The chosen backend is remembered
as the process's current one (`accel.current()`), and DeepSpeed is told the same (`DS_ACCELERATOR`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from accel._hpu_env import may_use_hpu, set_hpu_env_defaults
from accel._openmp import set_wait_defaults

set_wait_defaults()  # before anything imports torch, which reads these once
if may_use_hpu():
    set_hpu_env_defaults()  # before torch (which may autoload Habana's bridge): the bridge picks lazy/eager at import

from accel._host_memory import release as release_host_memory  # noqa: E402
from accel._host_memory import will_reuse_freed_blocks  # noqa: E402
from accel.errors import DeviceUnavailableError, UnsupportedDtypeError  # noqa: E402

if TYPE_CHECKING:
    from accel.base import Accelerator

DEVICE_CHOICES = ("auto", "cpu", "cuda", "hpu")
_FROM_BASE = ("Accelerator", "DTYPE_NAMES")  # they need torch: loaded on first use, so `--help` needs no torch


def __getattr__(name: str) -> Any:
    """`accel.Accelerator` and `accel.DTYPE_NAMES` import `accel.base` (and torch) on first use."""
    if name in _FROM_BASE:
        import accel.base

        return getattr(accel.base, name)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")


_current: Accelerator | None = None


def _backend_class(name: str) -> type[Accelerator]:
    if name == "cpu":
        from accel.cpu import CpuAccelerator

        return CpuAccelerator
    if name == "cuda":
        from accel.cuda import CudaAccelerator

        return CudaAccelerator
    if name == "hpu":
        from accel.hpu import HpuAccelerator

        return HpuAccelerator
    raise DeviceUnavailableError(f"unknown device {name!r}; use one of: {', '.join(DEVICE_CHOICES)}")


def detect() -> str:
    """The best device present: hpu if habana_frameworks imports, else cuda, else cpu."""
    for name in ("hpu", "cuda"):
        if _backend_class(name).is_available():
            return name
    return "cpu"


def get(name: str = "auto", local_rank: int | None = None) -> Accelerator:
    """Create the backend for `name` and make it the process's current backend.

    An explicit device that is not present raises `DeviceUnavailableError` with one actionable line.
    """
    global _current
    name = (name or "auto").lower()
    if name == "auto":
        name = os.environ.get("ACCEL_DEVICE", "") or detect()
    cls = _backend_class(name)
    if not cls.is_available():
        raise DeviceUnavailableError(cls.unavailable_reason())
    backend = cls(local_rank)
    os.environ["DS_ACCELERATOR"] = backend.ds_name
    _current = backend
    return backend


def current() -> Accelerator:
    """The backend chosen by the last `get` (auto-detected on first use)."""
    return _current if _current is not None else get("auto")


__all__ = [
    "Accelerator",
    "DeviceUnavailableError",
    "UnsupportedDtypeError",
    "DEVICE_CHOICES",
    "DTYPE_NAMES",
    "current",
    "detect",
    "get",
    "release_host_memory",
    "will_reuse_freed_blocks",
]
