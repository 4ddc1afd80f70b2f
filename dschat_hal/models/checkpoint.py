"""Gathering (ZeRO-3) and atomic saving of models in Hugging Face format."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dschat_hal.faults import apply_umask, disk_full_is_one_line, fault_point, remove_stale_temporaries
from dschat_hal.models.lora import LoRALinear, strip_lora_state


def gathered_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU, gathering ZeRO-3 partitions one parameter at a time.

    Collective under ZeRO-3: every rank must call it. LoRA factors are folded into their base
    weights and dropped, so the result loads into the plain architecture. With `keep=False` (ranks
    that do not write) each partitioned parameter is gathered for the others and dropped at once,
    and the result is empty: only the writing rank holds a copy of the model (as upstream's
    `save_zero_three_model`).
    """
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not (keep or hasattr(param, "ds_id")):
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if keep:
                state[name] = param.detach().cpu().clone()
    if not keep:
        return state
    for name, buffer in model.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear) and not layer.fused:
            prefix = f"{name}." if name else ""
            right, left = state[prefix + "lora_right_weight"], state[prefix + "lora_left_weight"]
            weight = state[prefix + "weight"]
            state[prefix + "weight"] = (weight.float() + (right.float() @ left.float()).t() * layer.lora_scaling).to(
                weight.dtype
            )
    return strip_lora_state(state)


@contextmanager
def atomic_directory(target: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Yield a temporary directory that replaces `target` only once the block completes.

    A crash inside the block leaves `target` untouched (old contents or absent), never half-written;
    the next save (or run) removes the leftovers. Modes follow the umask. With `enabled=False`
    (ranks that do not write) it yields None and touches nothing.
    """
    if not enabled:
        yield None
        return
    target = Path(target)
    kept = f"and the previous {target} is intact" if target.exists() else f"and {target} was not created"
    with disk_full_is_one_line(target, "the output", kept):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            yield tmp
            apply_umask(tmp)
            fault_point("publish")
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            if target.exists():
                target.rename(backup)
            tmp.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def save_tokenizer(tokenizer, model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Save `tokenizer` with `model_input_names` cut to the inputs `model.forward` takes, so that
    `model.generate(**tokenizer(text, return_tensors="pt"))` works on the reloaded pair (no
    `token_type_ids` for OPT, BLOOM, Llama, ...). The tokenizer object keeps the cut names.
    `fast_tokenizer` (which transformers does not read; earlier saves wrote it) is left out."""
    accepted = inspect.signature(model.forward).parameters
    names = [name for name in tokenizer.model_input_names if name in accepted]
    if "input_ids" in names:
        tokenizer.model_input_names = names
        tokenizer.init_kwargs["model_input_names"] = names  # what save_pretrained writes
    tokenizer.init_kwargs.pop("fast_tokenizer", None)
    tokenizer.save_pretrained(out_dir)


def write_lm(model: nn.Module, tokenizer, directory: Path | None) -> None:
    """Write a causal LM (LoRA fused, ZeRO-3 gathered) and its tokenizer into `directory` in HF
    format. Collective under ZeRO-3: every rank calls it; ranks that do not write pass None and keep
    nothing of what they gather."""
    model = getattr(model, "module", model)
    state = gathered_state_dict(model, keep=directory is not None)
    if directory is None:
        return
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    save_tokenizer(tokenizer, model, directory)


def save_lm(model: nn.Module, tokenizer, out_dir: str | os.PathLike, is_writer: bool = True) -> None:
    """Save a causal LM and its tokenizer to `out_dir` atomically (see `write_lm`)."""
    with atomic_directory(out_dir, enabled=is_writer) as tmp:
        write_lm(model, tokenizer, tmp)
