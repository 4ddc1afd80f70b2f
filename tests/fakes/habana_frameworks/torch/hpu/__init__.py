"""Stand-in of `habana_frameworks.torch.hpu`: one always-available device backed by the CPU, with what
optimum-habana 1.21 calls at import and at run time.

HPU graphs (`wrap_in_hpu_graph`, `wrap_in_hpu_graph_func`) behave as on the device where a caller can
tell: one graph per input signature (tensor shapes and dtypes, other arguments by value); the first
call with a signature captures into static copies of its inputs, every later call copies its inputs
into those buffers and overwrites the same output tensors, which it returns again (an output held from
an earlier call changes under its holder at the next replay; the caller's inputs are never written).
`bypass_hpu_graphs=True` at the call runs the plain forward. Every call is recorded in `graph_replays`
(capture, replay or bypass; autograd on; module training); `captures()` and `replays()` count them.
Refused in eager mode, as optimum-habana refuses HPU graphs without lazy mode.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

graph_wrapped: list[Any] = []  # modules and functions wrapped, in order
graph_replays: list[dict] = []  # one entry per call of a wrapped forward or function


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    """Not yet, when optimum-habana imports (its checkpointing then makes "hpu" torch's default device)."""
    return False


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device: Any) -> None:
    """One device."""


def get_device_name(device: Any = None) -> str:
    return "GAUDI2"


def synchronize() -> None:
    """CPU work is synchronous."""


def is_autocast_hpu_enabled() -> bool:
    return False


def get_autocast_hpu_dtype() -> torch.dtype:
    return torch.bfloat16


@contextlib.contextmanager
def sdp_kernel(enable_recompute: bool = False, **kwargs: Any) -> Iterator[None]:
    yield


class Stream:
    def __init__(self, device: Any = None, priority: int = 0) -> None:
        self.device = device

    def synchronize(self) -> None:
        """CPU work is synchronous."""

    def wait_stream(self, stream: Stream) -> None:
        """CPU work is synchronous."""


class Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing

    def record(self, stream: Stream | None = None) -> None:
        """CPU work is synchronous."""

    def synchronize(self) -> None:
        """CPU work is synchronous."""


def current_stream(device: Any = None) -> Stream:
    return Stream(device)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


_peak = [0]


def memory_allocated() -> int:
    _peak[0] = max(_peak[0], _rss())
    return _rss()


def max_memory_allocated() -> int:
    return max(_peak[0], _rss())


def memory_stats(device: Any = None) -> dict[str, int]:
    return {"InUse": memory_allocated(), "MaxInUse": max_memory_allocated(), "Limit": 0}


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    return repr(value)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _copy_into(static: Any, fresh: Any) -> None:
    """Write new values into captured tensors (tensors, or tuples/lists/dicts/model outputs of them)."""
    if isinstance(static, torch.Tensor):
        if static is not fresh:
            static.copy_(fresh)
    elif isinstance(static, (tuple, list)):
        for s, f in zip(static, fresh, strict=True):
            _copy_into(s, f)
    elif isinstance(static, dict):
        for name in static:
            _copy_into(static[name], fresh[name])


class _Graphs:
    """The graphs of one wrapped callable, keyed by the call's signature."""

    def __init__(self, fn: Callable[..., Any], name: str, module: torch.nn.Module | None) -> None:
        self.fn, self.name, self.module = fn, name, module
        self.graphs: dict[Any, tuple[tuple, dict, Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bypass = bool(kwargs.pop("bypass_hpu_graphs", False))
        key = _signature((args, kwargs))
        kind = "bypass" if bypass else "replay" if key in self.graphs else "capture"
        graph_replays.append(
            {
                "module": self.name,
                "kind": kind,
                "replay": kind == "replay",
                "grad_enabled": torch.is_grad_enabled(),
                "training": bool(self.module is not None and self.module.training),
            }
        )
        if bypass:
            return self.fn(*args, **kwargs)
        if kind == "capture":
            static_args, static_kwargs = _clone(args), _clone(kwargs)
            self.graphs[key] = (static_args, static_kwargs, self.fn(*static_args, **static_kwargs))
            return self.graphs[key][2]
        static_args, static_kwargs, outputs = self.graphs[key]
        _copy_into((static_args, static_kwargs), (args, kwargs))
        _copy_into(outputs, self.fn(*static_args, **static_kwargs))
        return outputs

    def clear_cache(self) -> None:
        self.graphs.clear()

    def clear_inputs(self) -> None:
        """The real bridge frees the captured inputs; here they stay (they are the replays' buffers)."""


def _refuse_in_eager_mode() -> None:
    import habana_frameworks.torch as htorch

    if not htorch.LAZY_MODE:
        raise RuntimeError("stand-in wrap_in_hpu_graph: HPU graphs need lazy mode (PT_HPU_LAZY_MODE=1)")


def wrap_in_hpu_graph(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """Replace `module.forward` for good with a graph-replaying forward; returns the same module."""
    _refuse_in_eager_mode()
    graph_wrapped.append(module)
    graphs = _Graphs(module.forward, type(module).__name__, module)
    module.forward = graphs
    module.clear_cache = graphs.clear_cache
    module.clear_inputs = graphs.clear_inputs
    return module


def wrap_in_hpu_graph_func(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """A graph-replaying version of `func` (the function itself is left as it is)."""
    _refuse_in_eager_mode()
    graph_wrapped.append(func)
    graphs = _Graphs(func, getattr(func, "__qualname__", type(func).__name__), getattr(func, "__self__", None))
    return functools.wraps(func)(graphs) if hasattr(func, "__name__") else graphs


def captures() -> int:
    return sum(r["kind"] == "capture" for r in graph_replays)


def replays() -> int:
    return sum(r["kind"] == "replay" for r in graph_replays)


random = types.SimpleNamespace(manual_seed_all=lambda seed: torch.manual_seed(seed))


def reset() -> None:
    graph_wrapped.clear()
    graph_replays.clear()
