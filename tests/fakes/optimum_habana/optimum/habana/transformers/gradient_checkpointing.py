"""Fake of optimum-habana's lazy-mode `checkpoint`: records each call, then checkpoints as torch does."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint as _torch_checkpoint  # bound before any patch

calls: list[str] = []


def checkpoint(function, *args, **kwargs):
    calls.append(getattr(function, "__qualname__", type(function).__name__))
    return _torch_checkpoint(function, *args, **kwargs)
