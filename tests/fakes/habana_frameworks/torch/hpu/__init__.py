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
    returns the same module. The fake records every call (the first captures, later ones replay),
    with whether autograd was on and whether the module was training, and runs the original forward."""
    graph_wrapped.append(module)
    original = module.forward
    shapes_seen: set = set()

    def replaying_forward(*f_args, **f_kwargs):
        shapes = tuple(tuple(a.shape) for a in (*f_args, *f_kwargs.values()) if isinstance(a, torch.Tensor))
        graph_replays.append(
            {
                "module": type(module).__name__,
                "replay": shapes in shapes_seen,
                "grad_enabled": torch.is_grad_enabled(),
                "training": module.training,
            }
        )
        shapes_seen.add(shapes)
        return original(*f_args, **f_kwargs)

    module.forward = replaying_forward
    return module


random = types.SimpleNamespace(manual_seed_all=lambda seed: torch.manual_seed(seed))


def reset() -> None:
    graph_wrapped.clear()
    graph_replays.clear()
