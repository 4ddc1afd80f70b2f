"""DPO's memory plan (training/step2_dpo_finetuning): the policy trained as step 1 trains its actor, on pairwise
micro-batches (chosen and rejected rows, each scored through the LM head in fp32), beside the frozen reference,
placed as `dschat_hal.dpo.reference_placement` places it (step 3's rule for its reference), whose no-grad
forward over the same rows runs while the policy's graph is kept for its backward."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dschat_hal.configs import with_flags
from dschat_hal.memory_plan.estimates import (
    frozen_states,
    inference_activations,
    optimizer_step_bytes,
    reused_heap_bytes,
    training_activations,
    training_states,
    zero3_gathered,
    zero_buffers,
)
from dschat_hal.memory_plan.phases import CPU_BASELINE_BYTES, Phase, Plan, _dropout, _trained, _width
from dschat_hal.memory_plan.shapes import model_shape

if TYPE_CHECKING:
    import torch

    from dschat_hal.configs import DPOStepConfig

DPO_STEP = 2  # DPO runs in place of step 2 (and step 3)


def dpo_plan(
    config: DPOStepConfig, device: str, ranks: int, memory: float | None, dtype: torch.dtype | None = None
) -> Plan:
    """DPO's phases per rank: training (the policy's states, activations and logits, the reference's weights,
    its forward's working set and fp32 logits) and, on the CPU, the optimizer step (`dtype`: the run's
    resolved dtype)."""
    from dschat_hal.dpo import reference_placement

    optim, stage, offload = config.optim, config.optim.zero_stage, config.hardware.offload
    width, dtype_name = _width(config.hardware, device, dtype)
    shape = model_shape(config.model.model_name_or_path, head=True)
    trainable, frozen = _trained(shape, optim, config.schedule.only_optimize_lora)
    states = training_states(trainable, frozen, shape.largest_layer, stage, ranks, width, offload, device)
    placement = reference_placement(config)
    reference = frozen_states(shape.params, placement.stage, ranks, width, placement.offload)
    rows, seq = 2 * config.model.per_device_train_batch_size, config.model.max_seq_len  # chosen, then rejected rows
    policy = training_activations(
        shape, rows, seq, width, optim.gradient_checkpointing, _dropout(optim), logits=True, fp32_loss=True
    )
    # the reference's logits, their fp32 copy and logsumexp's fp32 temporary, after its forward's working set
    reference_forward = inference_activations(shape, rows, seq, width) + rows * seq * shape.vocab * (width + 8)
    resident = {
        "training states": states.device,
        "reference": reference.device,
        "ZeRO buffers": zero_buffers(stage, trainable, width, device),
    }
    host = states.host + reference.host
    if device == "cpu":
        resident = {"process baseline": CPU_BASELINE_BYTES[DPO_STEP], **resident, "host": host}
        resident["heap kept for reuse"] = reused_heap_bytes(trainable, device)
    gathered = max(zero3_gathered(shape.params, stage, width), zero3_gathered(shape.params, placement.stage, width))
    training = {
        **resident,
        "ZeRO-3 gathered weights": gathered,
        "activations": policy,
        "reference forward": reference_forward,
    }
    phases = [Phase("training", training)]
    if device == "cpu":  # as in steps 1 and 2: freed small chunks stay in glibc's heap under the step
        freed = {"freed activations": policy + reference_forward, "freed gathered weights": gathered}
        step_temps = optimizer_step_bytes(stage, trainable, ranks, device, width, offload, shape.largest_layer)
        phases.append(Phase("optimizer step", {**resident, **freed, "optimizer-step temporaries": step_temps}))
    plan = Plan(DPO_STEP, device, ranks, memory, dtype_name, phases, host=host)
    plan.notes.append(
        f"DPO, {shape.name}: {shape.params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trained), "
        f"ZeRO {stage}{' + offload' if offload else ''}, micro-batch {rows} rows x {seq} "
        "(chosen + rejected)"
    )
    plan.notes.append(placement.describe("reference", ranks, step=""))
    return plan


def _candidates(config: DPOStepConfig, ranks: int) -> list[tuple[str, dict]]:
    """Step 2's single-flag changes, then the reference's own (partitioned, offloaded)."""
    from dschat_hal.memory_plan.fixes import _candidates as supervised_candidates

    out = supervised_candidates(config, DPO_STEP, ranks)
    dpo = config.dpo
    if dpo.reference_zero_stage == "auto" and config.optim.zero_stage != 3 and ranks > 1:
        out.append(("--reference_zero_stage 3", {"reference_zero_stage": "3"}))
    if not dpo.offload_reference_model and dpo.reference_zero_stage != "0":
        out.append(("--offload_reference_model", {"offload_reference_model": True}))
    return out


def dpo_fix(config: DPOStepConfig, plan: Plan, rounds: int = 6, dtype: torch.dtype | None = None) -> list[str] | None:
    """Flags that make DPO's `plan` fit, chosen as `memory_plan.find_fix` chooses them for the other steps;
    each tried on the config (`configs.with_flags`)."""

    def peak(trial: DPOStepConfig) -> float:
        return dpo_plan(trial, plan.device, plan.ranks, plan.device_memory, dtype).peak.total

    chosen: list[str] = []
    current = config
    for _ in range(rounds):
        trials = []
        for flag, changes in _candidates(current, plan.ranks):
            trial = with_flags(current, changes)
            trials.append((peak(trial), flag, trial))
            if trials[-1][0] <= plan.budget:
                return [*chosen, flag]
        if not trials:
            return None
        best, flag, trial = min(trials, key=lambda t: t[0])
        if best >= peak(current):
            return None
        chosen.append(flag)
        current = trial
    return None


def dpo_plan_for(config: DPOStepConfig, backend=None) -> Plan:
    """DPO's plan for this device, its ranks and memory (as `memory_plan.plan_for`), with the fix when it does
    not fit."""
    from dschat_hal.memory_plan import _gib, _locate, run_dtype

    device, ranks, memory, sharing = _locate(config, backend)
    dtype = run_dtype(config, backend)
    plan = dpo_plan(config, device, ranks, memory, dtype)
    if memory is not None and sharing > 1:
        plan.notes.append(f"host memory shared by the {sharing} ranks on this host: {_gib(memory)} each")
    if plan.fits is False:
        plan.fix = dpo_fix(config, plan, dtype=dtype)
    return plan


def dpo_dry_run(config: DPOStepConfig) -> dict:
    """DPO's `--dry_run`: print the plan (rank 0) and return its numbers; nothing is loaded or written."""
    import os

    from dschat_hal.memory_plan import render, summary

    plan = dpo_plan_for(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(render(plan), flush=True)
    return summary(plan)


def dpo_check(config: DPOStepConfig, backend) -> None:
    """Before loading weights: refuse in one line when DPO's plan cannot fit, unless `--skip_memory_check`."""
    from dschat_hal.errors import UserError
    from dschat_hal.memory_plan import refusal

    if config.plan.skip_memory_check:
        return
    plan = dpo_plan_for(config, backend)
    if plan.fits is False:
        message = refusal(plan).replace(f"step {DPO_STEP}", "DPO", 1)
        raise UserError(message.replace("training/plan.py shows the whole plan", "--dry_run shows the whole plan"))
