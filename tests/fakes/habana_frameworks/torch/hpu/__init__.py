"""Fake `habana_frameworks.torch.hpu`: one always-available device backed by the CPU."""

from __future__ import annotations

import types

import torch

graph_wrapped: list[torch.nn.Module] = []
graph_replays: list[dict] = []  # one entry per call of a wrapped forward


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def synchronize() -> None:
    """CPU work is synchronous."""


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


_peak = [0]


def memory_allocated() -> int:
    _peak[0] = max(_peak[0], _rss())
    return _rss()


def max_memory_allocated() -> int:
    return max(_peak[0], _rss())


def wrap_in_hpu_graph(module: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
    """Like the real function: replaces `module.forward` for good with a graph-replaying forward and
    returns the same module. One graph per input signature (shapes and dtypes): the first call
    captures it into static input buffers and static outputs; every replay copies the new inputs into
    that call's buffers and overwrites the same output tensors, which it returns again. So an output
    held from an earlier call changes under the caller at the next replay, as on the device. Each call
    is recorded (replay or capture, autograd on, module training). Refused in eager mode, as
    optimum-habana refuses HPU graphs without lazy mode."""
    import habana_frameworks.torch as htorch

    if not htorch.LAZY_MODE:
        raise RuntimeError("fake wrap_in_hpu_graph: HPU graphs need lazy mode (PT_HPU_LAZY_MODE=1)")
    graph_wrapped.append(module)
    original = module.forward
    graphs: dict[tuple, tuple[list, dict, object]] = {}

    def replaying_forward(*f_args, **f_kwargs):
        key = tuple(
            (name, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else (name, repr(value))
            for name, value in (*enumerate(f_args), *sorted(f_kwargs.items()))
        )
        replay = key in graphs
        graph_replays.append(
            {
                "module": type(module).__name__,
                "replay": replay,
                "grad_enabled": torch.is_grad_enabled(),
                "training": module.training,
            }
        )
        if not replay:
            static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in f_args]
            static_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in f_kwargs.items()}
            graphs[key] = (static_args, static_kwargs, original(*static_args, **static_kwargs))
            return graphs[key][2]
        static_args, static_kwargs, outputs = graphs[key]
        for buffer, value in (
            *zip(static_args, f_args, strict=True),
            *((static_kwargs[k], v) for k, v in f_kwargs.items()),
        ):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        fresh = original(*static_args, **static_kwargs)
        _copy_into(outputs, fresh)
        return outputs

    module.forward = replaying_forward
    return module


def _copy_into(static, fresh) -> None:
    """Write a replay's results into the captured outputs (tensors, or tuples/lists/dicts of them)."""
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, (tuple, list)):
        for s, f in zip(static, fresh, strict=True):
            _copy_into(s, f)
    elif isinstance(static, dict):
        for name in static:
            _copy_into(static[name], fresh[name])


random = types.SimpleNamespace(manual_seed_all=lambda seed: torch.manual_seed(seed))


def reset() -> None:
    graph_wrapped.clear()
    graph_replays.clear()
