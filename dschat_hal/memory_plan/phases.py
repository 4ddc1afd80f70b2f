"""The phases of steps 1-3 and what each holds per rank, from a step's config (`dschat_hal.configs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dschat_hal.decisions import RunDecisions, decide, experience_rows
from dschat_hal.memory_plan.estimates import (
    States,
    frozen_states,
    gradient_bytes,
    inference_activations,
    kv_cache_bytes,
    optimizer_step_bytes,
    reused_heap_bytes,
    training_activations,
    training_states,
    zero3_gathered,
    zero_buffers,
)
from dschat_hal.memory_plan.shapes import Shape, model_shape, tp_fallback_reason

if TYPE_CHECKING:
    import torch

    from dschat_hal.configs import HardwareConfig, OptimConfig, Step1Config, Step2Config, Step3Config

    SupervisedConfig = Step1Config | Step2Config

GiB = 1024**3
MiB = 1024**2
FIT_FRACTION = 0.92  # of device memory: the runtime's context and allocator fragmentation take the rest
CPU_BASELINE_BYTES = {1: 495 * MiB, 2: 500 * MiB, 3: 520 * MiB}  # VmHWM of each step with the 0.3M tiny-opt


@dataclass
class Phase:
    name: str
    parts: dict[str, float]  # device bytes per rank, by what holds them

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    step: int
    device: str
    ranks: int
    device_memory: float | None
    dtype: str
    phases: list[Phase]
    host: float = 0.0  # host bytes per rank (offloaded states)
    notes: list[str] = field(default_factory=list)
    fix: list[str] | None = None

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def budget(self) -> float | None:
        return None if self.device_memory is None else FIT_FRACTION * self.device_memory

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak.total <= self.budget


def _width(hardware: HardwareConfig, device: str, resolved: torch.dtype | None = None) -> tuple[int, str]:
    """(bytes per weight, dtype name): the run's `resolved` dtype (the backend's choice), else `--dtype`
    as the plan resolves it without a backend."""
    import torch

    if resolved is None:
        name = hardware.dtype
        if name in (None, "auto"):
            if device == "cpu":
                from accel.cpu import native_bf16_flags

                name = "bf16" if native_bf16_flags() else "fp32"
            else:
                name = "bf16"
        return (4, "fp32") if name == "fp32" else (2, name)
    return (4, "fp32") if resolved == torch.float32 else (2, str(resolved).removeprefix("torch."))


def _trained(shape: Shape, optim: OptimConfig, only_lora: bool, keep: int = 0) -> tuple[int, int]:
    """(trainable, frozen) parameters with LoRA / --only_optimize_lora (`only_lora`); `keep` stays trainable."""
    lora, lora_frozen = shape.lora(optim.lora_module_name, optim.lora_dim)
    if lora and only_lora:
        return lora + keep, shape.params
    return shape.params - lora_frozen + lora, lora_frozen


def _dropout(optim: OptimConfig) -> bool:
    return optim.dropout is None or optim.dropout > 0


def _fp32_loss(hardware: HardwareConfig) -> bool:
    """`--compute_fp32_loss` (a device's own default, e.g. bloom/llama on Gaudi, is the flag the
    example scripts pass)."""
    return bool(hardware.compute_fp32_loss)


def supervised_plan(
    config: SupervisedConfig,
    step: int,
    device: str,
    ranks: int,
    memory: float | None,
    dtype: torch.dtype | None = None,
) -> Plan:
    """Steps 1 and 2: one trained model, one training phase (`dtype`: the run's resolved dtype)."""
    model, optim, hardware = config.model, config.optim, config.hardware
    stage, offload = optim.zero_stage, hardware.offload
    width, dtype_name = _width(hardware, device, dtype)
    shape = model_shape(model.model_name_or_path, head=step == 1)
    trainable, frozen = _trained(
        shape, optim, config.schedule.only_optimize_lora, keep=shape.hidden if step == 2 else 0
    )
    states = training_states(trainable, frozen, shape.largest_layer, stage, ranks, width, offload, device)
    rows = model.per_device_train_batch_size * (2 if step == 2 else 1)  # step 2: chosen and rejected rows
    act = training_activations(
        shape,
        rows,
        model.max_seq_len,
        width,
        optim.gradient_checkpointing,
        _dropout(optim),
        logits=step == 1,
        fp32_loss=_fp32_loss(hardware),
    )
    resident = {
        "training states": states.device,
        "ZeRO buffers": zero_buffers(stage, trainable, width, device),
    }
    if device == "cpu":
        resident = {"process baseline": CPU_BASELINE_BYTES[step], **resident, "host": states.host}
        resident["heap kept for reuse"] = reused_heap_bytes(trainable, device)
    gathered = zero3_gathered(shape.params, stage, width)
    phases = [Phase("training", {**resident, "ZeRO-3 gathered weights": gathered, "activations": act})]
    if device == "cpu":
        step_temps = optimizer_step_bytes(stage, trainable, ranks, device, width, offload, shape.largest_layer)
        # glibc keeps freed small chunks (activations, gathered layers) in its heap: the step comes on top
        freed = {"freed activations": act, "freed gathered weights": gathered}
        phases.append(Phase("optimizer step", {**resident, **freed, "optimizer-step temporaries": step_temps}))
    plan = Plan(step, device, ranks, memory, dtype_name, phases, host=states.host)
    plan.notes.append(
        f"{shape.name}: {shape.params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trained), "
        f"ZeRO {stage}{' + offload' if offload else ''}, micro-batch {rows} rows x {model.max_seq_len}"
        + (" (chosen + rejected)" if step == 2 else "")
    )
    return plan


def decide_for(
    config: Step3Config, device: str, ranks: int, memory: float | None, dtype: torch.dtype | None = None
) -> RunDecisions:
    """Step 3's decisions (`dschat_hal.decisions.decide`) with this plan's measurements: each frozen
    model's weight bytes, and whether the plan of a trial fits `memory` (None: unknown)."""
    if memory is None:
        return decide(config, ranks)
    width = _width(config.hardware, device, dtype)[0]
    frozen_bytes = {
        "reference": width * model_shape(config.models.actor_model_name_or_path, head=True).params,
        "reward": width * model_shape(config.models.critic_model_name_or_path, head=False).params,
    }
    return decide(
        config, ranks, frozen_bytes, lambda trial: rlhf_plan(config, device, ranks, memory, trial, dtype).fits
    )


def rlhf_plan(
    config: Step3Config,
    device: str,
    ranks: int,
    memory: float | None,
    decisions: RunDecisions | None = None,
    dtype: torch.dtype | None = None,
) -> Plan:
    """Step 3: resident actor/critic states and frozen reference/reward, then the three phases, as
    `decisions` has them (default: `decide_for` these flags, device, ranks and memory): where the frozen
    models live, whether a critic is built (a critic-free `--advantage_estimator` has none: no critic
    states, gathers or activations; its experience is prompts x `--n_samples_per_prompt` rows), whether
    its graph is kept through the actor's update, the gather group of a ZeRO-3 hybrid engine."""
    decisions = decisions or decide_for(config, device, ranks, memory, dtype)
    placement = decisions.placements
    engine, ppo, offload = config.engine, config.ppo, config.hardware.offload
    width, dtype_name = _width(config.hardware, device, dtype)
    actor = model_shape(config.models.actor_model_name_or_path, head=True)
    critic = model_shape(config.models.critic_model_name_or_path, head=False)
    a_stage, c_stage = config.actor.zero_stage, config.critic.zero_stage
    a_train, a_frozen = _trained(actor, config.actor, config.schedule.only_optimize_lora)
    c_train, c_frozen = _trained(critic, config.critic, config.schedule.only_optimize_lora)
    critic_used = decisions.critic
    if not critic_used:
        c_train = c_frozen = 0
    actor_states = training_states(a_train, a_frozen, actor.largest_layer, a_stage, ranks, width, offload, device)
    critic_states = (
        training_states(c_train, c_frozen, critic.largest_layer, c_stage, ranks, width, offload, device)
        if critic_used
        else States(0.0)
    )
    ref_at, reward_at = placement["reference"], placement["reward"]
    ref = frozen_states(actor.params, ref_at.stage, ranks, width, ref_at.offload)
    reward = frozen_states(critic.params, reward_at.stage, ranks, width, reward_at.offload)
    resident = {
        "actor states": actor_states.device,
        "critic states": critic_states.device,
        "reference": ref.device,
        "reward": reward.device,
    }
    if not critic_used:
        del resident["critic states"]
    host = actor_states.host + critic_states.host + ref.host + reward.host
    if config.models.enable_ema:  # the EMA copy: the actor with its LoRA factors, built with offload on
        lora_added = actor.lora(config.actor.lora_module_name, config.actor.lora_dim)[0]
        ema = frozen_states(actor.params + lora_added, a_stage, ranks, width, True)
        resident["actor EMA"] = ema.device
        host += ema.host
    resident["ZeRO buffers"] = zero_buffers(a_stage, a_train, width, device) + (
        zero_buffers(c_stage, c_train, width, device) if critic_used else 0.0
    )
    if device == "cpu":
        resident = {"process baseline": CPU_BASELINE_BYTES[3], **resident, "host": host}
        resident["heap kept for reuse"] = reused_heap_bytes(a_train + (c_train if critic_used else 0), device)

    gen_batch = experience_rows(config)
    train_batch = ppo.per_device_training_batch_size
    seq = engine.max_prompt_seq_len + engine.max_answer_seq_len
    tp = max(1, int(engine.inference_tp_size or 1))
    hybrid = engine.enable_hybrid_engine
    fallback = tp_fallback_reason(config.models.actor_model_name_or_path, tp) if hybrid else None
    if fallback:  # planned as it will run: the engine makes the same decision and generates at T = 1
        tp = 1
    copy_bytes = 0.0
    refill = 0.0
    if hybrid and a_stage == 3:
        layers_part = actor.layer_params / tp
        copy_bytes = width * (actor.params - actor.layer_params + layers_part)
        group = decisions.gather_group_layers or actor.layers
        refill = width * actor.layer_params * min(group, actor.layers) / actor.layers
    cache = kv_cache_bytes(actor, gen_batch, seq, width, tp if hybrid else 1)
    keep_copy = copy_bytes if not engine.unpin_actor_parameters else 0.0
    keep_cache = (
        cache
        if hybrid and not (engine.release_inference_cache or (copy_bytes and engine.unpin_actor_parameters))
        else 0.0
    )

    generation = dict(resident)
    if copy_bytes:
        generation.update({"inference copy": copy_bytes, "gathered layer group": refill})
    generation["KV cache"] = cache
    generation["decode working set"] = inference_activations(actor, gen_batch, engine.max_prompt_seq_len, width) + (
        4 * gen_batch * actor.vocab
    )
    experience = dict(resident)
    if keep_copy:
        experience["inference copy"] = keep_copy
    if keep_cache:
        experience["KV cache"] = keep_cache
    experience["ZeRO-3 gathered weights"] = max(  # the reference and reward forwards too
        zero3_gathered(actor.params, max(a_stage, ref_at.stage), width),
        zero3_gathered(critic.params, max(c_stage if critic_used else 0, reward_at.stage), width),
    )
    head_positions = engine.max_answer_seq_len + 1  # step 3 applies the LM head to the answer only
    experience["actor + reference logits"] = gen_batch * head_positions * actor.vocab * (2 * width + 8)  # + fp32
    experience["forward working set"] = inference_activations(actor, gen_batch, seq, width)
    training = dict(resident)
    if keep_copy:
        training["inference copy"] = keep_copy
    if keep_cache:
        training["KV cache"] = keep_cache
    fp32_loss = True  # log-probs are computed in fp32
    actor_act = training_activations(
        actor, train_batch, seq, width, config.actor.gradient_checkpointing, _dropout(config.actor), True, fp32_loss,
        head_positions,
    )  # fmt: skip
    critic_act = (
        training_activations(
            critic, train_batch, seq, width, config.critic.gradient_checkpointing, _dropout(config.critic), False, False
        )
        if critic_used
        else 0.0
    )
    actor_gathered, critic_gathered = (
        zero3_gathered(actor.params, a_stage, width),
        zero3_gathered(critic.params, c_stage, width) if critic_used else 0.0,
    )
    if decisions.critic_graph_kept:  # its forward before the actor's update, its backward after
        training["ZeRO-3 gathered weights"] = actor_gathered + critic_gathered
        training["actor activations"] = actor_act
        training["critic activations (kept through the actor's update)"] = critic_act
    else:
        training["ZeRO-3 gathered weights"] = max(actor_gathered, critic_gathered)
        training["actor activations" if actor_act >= critic_act else "critic activations"] = max(actor_act, critic_act)
    phases = [Phase("generation", generation), Phase("experience", experience), Phase("training", training)]
    if device == "cpu":
        step_parts = {(k if not k.endswith("activations") else "freed activations"): v for k, v in training.items()}
        step_parts.pop("ZeRO-3 gathered weights")
        step_parts["freed gathered weights"] = actor_gathered + critic_gathered
        step_parts["optimizer-step temporaries"] = max(
            optimizer_step_bytes(a_stage, a_train, ranks, device, width, offload, actor.largest_layer),
            optimizer_step_bytes(c_stage, c_train, ranks, device, width, offload, critic.largest_layer),
        )
        one_at_a_time = (
            config.schedule.gradient_accumulation_steps == 1 and not ppo.align_overflow
        )  # else both backwards first
        if critic_used and one_at_a_time:  # the other model's gradients (and bucket pages): freed, or not yet made
            a_live = gradient_bytes(a_train, a_stage, ranks, width) + zero_buffers(a_stage, a_train, width, device)
            c_live = gradient_bytes(c_train, c_stage, ranks, width) + zero_buffers(c_stage, c_train, width, device)
            step_parts["the other model's gradients, not alive"] = -min(a_live, c_live)
        phases.append(Phase("optimizer step", step_parts))
    plan = Plan(3, device, ranks, memory, dtype_name, phases, host=host)
    critic_note = (
        f"critic {critic.name}: {critic.params / 1e6:.1f}M ({c_train / 1e6:.1f}M trained, ZeRO {c_stage})"
        if critic_used
        else f"no critic ({ppo.advantage_estimator})"
    )
    plan.notes.append(
        f"actor {actor.name}: {actor.params / 1e6:.1f}M ({a_train / 1e6:.1f}M trained, ZeRO {a_stage}); "
        f"{critic_note}; "
        f"generation {gen_batch} x {seq}, training {train_batch} x {seq}"
        + (f", hybrid engine{f' TP {tp}' if tp > 1 else ''}" if hybrid else "")
    )
    if fallback:
        plan.notes.append(f"hybrid engine: --inference_tp_size {engine.inference_tp_size} falls back to 1: {fallback}")
    plan.notes.extend(at.describe(name, ranks, step="") for name, at in placement.items())
    return plan


def build(
    config: SupervisedConfig | Step3Config,
    step: int,
    device: str,
    ranks: int,
    memory: float | None,
    decisions: RunDecisions | None = None,
    dtype: torch.dtype | None = None,
) -> Plan:
    """The plan of `config` for `step` (step 3: with `decisions`, default: decided here for this config and
    memory); `dtype`: the run's resolved dtype (default: `--dtype` as the plan resolves it)."""
    if step == 3:
        return rlhf_plan(config, device, ranks, memory, decisions, dtype)
    return supervised_plan(config, step, device, ranks, memory, dtype)
