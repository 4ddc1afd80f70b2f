"""Bridge to DeepSpeed's own accelerator object, so the layer reuses it instead of duplicating it."""

from __future__ import annotations

import os
from typing import Any


def ds_accelerator(name: str) -> Any:
    """DeepSpeed's accelerator for `name` (cpu|cuda|hpu), making DeepSpeed agree with this layer.

    `DS_ACCELERATOR` is set before DeepSpeed picks its accelerator; if DeepSpeed already chose a
    different one in this process, it is replaced so that both layers see the same hardware.
    """
    os.environ["DS_ACCELERATOR"] = name
    from deepspeed.accelerator import get_accelerator, set_accelerator

    current = get_accelerator()
    if current.device_name() != name:
        from deepspeed.accelerator import real_accelerator

        real_accelerator.ds_accelerator = None
        fresh = get_accelerator()
        set_accelerator(fresh)
        current = fresh
    return current
