"""Fake of the `hpu_backend` torch.compile backend the real package registers: records each
compiled graph and runs it eagerly on the CPU."""

from __future__ import annotations

import sys

import torch

compiled_graphs: list[torch.fx.GraphModule] = []


def hpu_backend(gm: torch.fx.GraphModule, example_inputs):
    # dynamo keeps the first registration for the process: record into the module imported now
    sys.modules[__name__].compiled_graphs.append(gm)
    return gm.forward


def register() -> None:
    from torch._dynamo import list_backends, register_backend

    if "hpu_backend" not in list_backends(exclude_tags=()):
        register_backend(name="hpu_backend")(hpu_backend)


def reset() -> None:
    compiled_graphs.clear()
