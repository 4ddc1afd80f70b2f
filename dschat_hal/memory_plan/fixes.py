"""Which flags would make a plan fit: each candidate is a flag change, tried on the step's config
(`configs.with_flags`: `dataclasses.replace` of the parts it touches) and reported as the flags to add."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dschat_hal.configs import with_flags
from dschat_hal.memory_plan.phases import Plan, build
from dschat_hal.memory_plan.shapes import tp_fallback_reason

if TYPE_CHECKING:
    import torch

    from dschat_hal.configs import Step1Config, Step2Config, Step3Config


def _candidates(config, step: int, ranks: int) -> list[tuple[str, dict]]:
    """Single-flag changes, cheapest in speed first; each is (the flag as typed, new flag values)."""
    out: list[tuple[str, dict]] = []
    offload = config.hardware.offload
    if step in (1, 2):
        optim, schedule = config.optim, config.schedule
        if not optim.gradient_checkpointing:
            out.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
        for stage in range(optim.zero_stage + 1, 4):
            if ranks > 1:
                out.append((f"--zero_stage {stage}", {"zero_stage": stage}))
        if not offload:
            out.append(("--offload", {"offload": True, "zero_stage": max(optim.zero_stage, 1)}))
        if not optim.lora_dim:
            out.append(("--lora_dim 128 --only_optimize_lora", {"lora_dim": 128, "only_optimize_lora": True}))
        batch = config.model.per_device_train_batch_size
        while batch > 1:
            batch //= 2
            accum = schedule.gradient_accumulation_steps * config.model.per_device_train_batch_size // batch
            out.append(
                (
                    f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accum}",
                    {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum},
                )
            )
        return out
    engine, frozen = config.engine, config.frozen
    for who in ("actor", "critic"):
        if not getattr(config, who).gradient_checkpointing:
            out.append((f"--{who}_gradient_checkpointing", {f"{who}_gradient_checkpointing": True}))
    if engine.enable_hybrid_engine and config.actor.zero_stage == 3:
        if not engine.release_inference_cache:
            out.append(("--release_inference_cache", {"release_inference_cache": True}))
        if not engine.unpin_actor_parameters:
            out.append(("--unpin_actor_parameters", {"unpin_actor_parameters": True}))
        tp = int(engine.inference_tp_size or 1)
        while tp * 2 <= ranks:
            tp *= 2
            if tp_fallback_reason(config.models.actor_model_name_or_path, tp) is None:  # else the engine uses T = 1
                out.append((f"--inference_tp_size {tp}", {"inference_tp_size": tp}))
    for who in ("reference", "reward"):
        if getattr(frozen, f"{who}_zero_stage") == "0" and ranks > 1:
            out.append((f"--{who}_zero_stage 3", {f"{who}_zero_stage": "3"}))
        elif not getattr(frozen, f"offload_{who}_model"):
            out.append((f"--offload_{who}_model", {f"offload_{who}_model": True}))
    for who in ("actor", "critic"):
        for stage in range(getattr(config, who).zero_stage + 1, 4):
            if ranks > 1:
                out.append((f"--{who}_zero_stage {stage}", {f"{who}_zero_stage": stage}))
    if not offload:
        out.append(
            (
                "--offload",
                {
                    "offload": True,
                    "actor_zero_stage": max(config.actor.zero_stage, 1),
                    "critic_zero_stage": max(config.critic.zero_stage, 1),
                },
            )
        )
    if not config.actor.lora_dim:
        out.append(("--actor_lora_dim 128 --only_optimize_lora", {"actor_lora_dim": 128, "only_optimize_lora": True}))
    for name, batch in (
        ("per_device_training_batch_size", config.ppo.per_device_training_batch_size),
        ("per_device_generation_batch_size", engine.per_device_generation_batch_size),
    ):
        while batch > 1:
            batch //= 2
            out.append((f"--{name} {batch}", {name: batch}))
    return out


def find_fix(
    config: Step1Config | Step2Config | Step3Config, plan: Plan, rounds: int = 6, dtype: torch.dtype | None = None
) -> list[str] | None:
    """Flags that make `plan` (of `config`, in `dtype`: the run's resolved dtype) fit: the first single
    change (cheapest in speed first) that does; else the change that lowers the peak most, then again
    from there, for up to `rounds` changes. None when that is not enough."""
    chosen: list[str] = []
    current = config
    for _ in range(rounds):
        trials = []
        for flag, changes in _candidates(current, plan.step, plan.ranks):
            trial = with_flags(current, changes)  # step 3's decisions are made again (`build`)
            peak = build(trial, plan.step, plan.device, plan.ranks, plan.device_memory, dtype=dtype).peak.total
            if peak <= plan.budget:
                return [*chosen, flag]
            trials.append((peak, flag, trial))
        if not trials:
            return None
        peak, flag, trial = min(trials, key=lambda t: t[0])
        if peak >= build(current, plan.step, plan.device, plan.ranks, plan.device_memory, dtype=dtype).peak.total:
            return None
        chosen.append(flag)
        current = trial
    return None
