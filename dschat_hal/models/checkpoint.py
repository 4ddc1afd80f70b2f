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

ADAPTER_DIR = "lora_adapter"  # PEFT's adapter_config.json + adapter_model.safetensors, beside the merged model


def gathered_state_dict(
    model: nn.Module, keep: bool = True, adapters: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU, gathering ZeRO-3 partitions one parameter at a time.

    Collective under ZeRO-3: every rank must call it. LoRA factors are folded into their base
    weights and dropped, so the result loads into the plain architecture. With `keep=False` (ranks
    that do not write) each partitioned parameter is gathered for the others and dropped at once,
    and the result is empty: only the writing rank holds a copy of the model (as upstream's
    `save_zero_three_model`). `adapters`, when given, receives the LoRA factors in PEFT's layout
    (`<module>.lora_A.weight` = Aᵀ, `<module>.lora_B.weight` = Bᵀ: ΔW = lora_B · lora_A · scaling).
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
            if adapters is not None:
                adapters[prefix + "lora_A.weight"] = right.t().contiguous()
                adapters[prefix + "lora_B.weight"] = left.t().contiguous()
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


def write_lm(model: nn.Module, tokenizer, directory: Path | None, adapter_base: str | None = None) -> None:
    """Write a causal LM (LoRA fused, ZeRO-3 gathered) and its tokenizer into `directory` in HF
    format; with `adapter_base` (the model the LoRA factors were trained on, frozen) and LoRA layers,
    also the adapters in PEFT's format in `directory/lora_adapter`. Collective under ZeRO-3: every
    rank calls it; ranks that do not write pass None and keep nothing of what they gather."""
    model = getattr(model, "module", model)
    adapters: dict[str, torch.Tensor] | None = {} if adapter_base is not None else None
    state = gathered_state_dict(model, keep=directory is not None, adapters=adapters)
    if directory is None:
        return
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    save_tokenizer(tokenizer, model, directory)
    if adapters:
        write_peft_adapter(model, adapters, adapter_base, Path(directory) / ADAPTER_DIR)


def adapter_base(lora_dim: int, only_lora: bool, base: str) -> str | None:
    """Where the LoRA adapters' base model is (a local directory made absolute), when adapters are
    saved: with LoRA and `--only_optimize_lora` (the base frozen, so base + adapters = the merged
    model; when the base trained too, only the merged model reproduces the run)."""
    if not (lora_dim > 0 and only_lora):
        return None
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else base


def write_peft_adapter(model: nn.Module, adapters: dict[str, torch.Tensor], base: str, directory: Path) -> None:
    """LoRA factors as PEFT saves a causal LM's LoRA adapter, loadable with
    `PeftModel.from_pretrained(<base model>, directory)`: `adapter_config.json` and
    `adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`.
    Our `lora_scaling` (scaling / r) is PEFT's lora_alpha / r."""
    import json

    from safetensors.torch import save_file

    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoRALinear)}
    ranks = {value.shape[0] for key, value in adapters.items() if key.endswith("lora_A.weight")}
    scalings = {layer.lora_scaling for layer in layers.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"LoRA layers of different ranks {sorted(ranks)} or scalings {sorted(scalings)}")
    (rank,), (scaling,) = ranks, scalings
    alpha = scaling * rank
    dropouts = {getattr(layer.lora_dropout, "p", 0.0) for layer in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {f"base_model.model.{key}": value for key, value in adapters.items()}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_lm(model: nn.Module, tokenizer, out_dir: str | os.PathLike, is_writer: bool = True) -> None:
    """Save a causal LM and its tokenizer to `out_dir` atomically (see `write_lm`)."""
    with atomic_directory(out_dir, enabled=is_writer) as tmp:
        write_lm(model, tokenizer, tmp)
