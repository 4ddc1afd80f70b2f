"""Fake `habana_frameworks.torch.utils.internal`: `is_lazy()` answers the mode the bridge fixed when
`habana_frameworks.torch` was imported, whatever the environment says later."""

from __future__ import annotations


def is_lazy() -> bool:
    import habana_frameworks.torch as htorch

    return htorch.LAZY_MODE
