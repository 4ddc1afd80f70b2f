"""Fake `habana_frameworks.torch.hpu`: one always-available device backed by the CPU."""

from __future__ import annotations

import types

import torch

graph_wrapped: list[torch.nn.Module] = []


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
    """Records the module and returns it unchanged (the real one captures and replays its forward)."""
    graph_wrapped.append(module)
    return module


random = types.SimpleNamespace(manual_seed_all=lambda seed: torch.manual_seed(seed))


def reset() -> None:
    graph_wrapped.clear()
