"""What a model can do, read from its class and config (no weights needed: a meta build will do): whether
our static-cache decode loop can serve it, and whether DeepSpeed's AutoTP can shard it. Below both the
generation engine, which acts on the answers, and the memory plan, which plans what the engine will do."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io

import torch
from torch import nn


@functools.cache
def forward_takes(model_class: type, name: str) -> bool:
    """Whether `model_class.forward` takes an argument called `name`."""
    return name in inspect.signature(model_class.forward).parameters


def static_cache_reason(model: nn.Module) -> str | None:
    """Why the decode loop cannot serve `model` (None when it can)."""
    if forward_takes(type(model), "token_idx"):
        # optimum-habana's patched classes ignore cache_position, take the past length from the cache's
        # shape and write in place only at a token_idx: transformers' StaticCache is never filled there
        return f"{type(model).__name__} (optimum-habana) keeps its own static KV cache through token_idx"
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"{type(model).__name__} has no static KV cache support in this transformers version"
    if not forward_takes(type(model), "cache_position"):
        return f"{type(model).__name__}.forward takes no cache_position"
    return None


def kv_heads(config) -> int | None:
    """Key/value heads of a model config (its attention heads without grouped-query attention)."""
    for name in ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def tp_unsupported_reason(model: nn.Module, tp_size: int) -> str | None:
    """Why AutoTP (or our cache) cannot shard `model` over `tp_size` ranks (None when it can)."""
    reason = static_cache_reason(model)
    if reason:
        return reason
    heads = kv_heads(model.config)
    if heads is None or heads % tp_size:
        return f"{type(model).__name__} has {heads} key/value heads, not a multiple of {tp_size}"
    from deepspeed.module_inject.auto_tp import AutoTP

    with torch.device("meta"):
        probe = type(model)(model.config)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            supported = AutoTP.supported(probe) and bool(AutoTP.tp_parser(probe))
    except (AssertionError, ValueError) as err:
        return f"DeepSpeed's AutoTP cannot shard {type(model).__name__}: {err}"
    return None if supported else f"DeepSpeed's AutoTP does not support {type(model).__name__}"
