"""Which flags would make a plan fit."""

from __future__ import annotations

import argparse
import copy

from dschat_hal.memory_plan.phases import Plan, build
from dschat_hal.memory_plan.shapes import tp_fallback_reason


def _candidates(args, step: int, ranks: int) -> list[tuple[str, dict]]:
    """Single-flag changes, cheapest in speed first; each is (the flag as typed, new attribute values)."""
    out: list[tuple[str, dict]] = []
    if step in (1, 2):
        if not args.gradient_checkpointing:
            out.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
        for stage in range(args.zero_stage + 1, 4):
            if ranks > 1:
                out.append((f"--zero_stage {stage}", {"zero_stage": stage}))
        if not args.offload:
            out.append(("--offload", {"offload": True, "zero_stage": max(args.zero_stage, 1)}))
        if not args.lora_dim:
            out.append(("--lora_dim 128 --only_optimize_lora", {"lora_dim": 128, "only_optimize_lora": True}))
        batch = args.per_device_train_batch_size
        while batch > 1:
            batch //= 2
            accum = args.gradient_accumulation_steps * args.per_device_train_batch_size // batch
            out.append(
                (
                    f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accum}",
                    {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum},
                )
            )
        return out
    for who in ("actor", "critic"):
        if not getattr(args, f"{who}_gradient_checkpointing"):
            out.append((f"--{who}_gradient_checkpointing", {f"{who}_gradient_checkpointing": True}))
    if args.enable_hybrid_engine and args.actor_zero_stage == 3:
        if not args.release_inference_cache:
            out.append(("--release_inference_cache", {"release_inference_cache": True}))
        if not args.unpin_actor_parameters:
            out.append(("--unpin_actor_parameters", {"unpin_actor_parameters": True}))
        tp = int(getattr(args, "inference_tp_size", 1) or 1)
        while tp * 2 <= ranks:
            tp *= 2
            if tp_fallback_reason(args.actor_model_name_or_path, tp) is None:  # else the engine uses T = 1
                out.append((f"--inference_tp_size {tp}", {"inference_tp_size": tp}))
    for who in ("reference", "reward"):
        if getattr(args, f"{who}_zero_stage", "auto") == "0" and ranks > 1:
            out.append((f"--{who}_zero_stage 3", {f"{who}_zero_stage": "3"}))
        elif not getattr(args, f"offload_{who}_model"):
            out.append((f"--offload_{who}_model", {f"offload_{who}_model": True}))
    for who in ("actor", "critic"):
        for stage in range(getattr(args, f"{who}_zero_stage") + 1, 4):
            if ranks > 1:
                out.append((f"--{who}_zero_stage {stage}", {f"{who}_zero_stage": stage}))
    if not args.offload:
        out.append(
            (
                "--offload",
                {
                    "offload": True,
                    "actor_zero_stage": max(args.actor_zero_stage, 1),
                    "critic_zero_stage": max(args.critic_zero_stage, 1),
                },
            )
        )
    if not args.actor_lora_dim:
        out.append(("--actor_lora_dim 128 --only_optimize_lora", {"actor_lora_dim": 128, "only_optimize_lora": True}))
    for name in ("per_device_training_batch_size", "per_device_generation_batch_size"):
        batch = getattr(args, name)
        while batch > 1:
            batch //= 2
            out.append((f"--{name} {batch}", {name: batch}))
    return out


def find_fix(args: argparse.Namespace, plan: Plan, rounds: int = 6) -> list[str] | None:
    """Flags that make `plan` fit: the first single change (cheapest in speed first) that does;
    else the change that lowers the peak most, then again from there, for up to `rounds` changes.
    None when that is not enough."""
    chosen: list[str] = []
    current = args
    for _ in range(rounds):
        trials = []
        for flag, changes in _candidates(current, plan.step, plan.ranks):
            trial = copy.copy(current)  # other flags: step 3's decisions are made again (`build`)
            for key, value in changes.items():
                setattr(trial, key, value)
            peak = build(trial, plan.step, plan.device, plan.ranks, plan.device_memory).peak.total
            if peak <= plan.budget:
                return [*chosen, flag]
            trials.append((peak, flag, trial))
        if not trials:
            return None
        peak, flag, trial = min(trials, key=lambda t: t[0])
        if peak >= build(current, plan.step, plan.device, plan.ranks, plan.device_memory).peak.total:
            return None
        chosen.append(flag)
        current = trial
    return None
