"""Memory plan: the peak bytes per rank of each phase of steps 1-3, from the model configs alone.

No weights are read: parameter counts come from building each model on the meta device. What is counted, per rank:

- training states (actor, critic, step-1/2 model): parameters, gradients, fp32 master weights,
  fp32 gradients and Adam's two moments, split by the ZeRO stage as DeepSpeed splits them (its
  own estimators use the same accounting: `tests/test_memory_plan.py` holds them equal), with
  `--offload` moving the optimizer's part (ZeRO-3: the parameters too) to host memory;
- frozen models (reference, reward, EMA): their weights in the training dtype (ZeRO-3: 1/N);
- activations kept for the backward pass (per layer and token: the inputs of every matmul, norm and
  activation function; with gradient checkpointing one hidden state per layer plus one layer
  recomputed), the logits and the loss's copies of them;
- step 3's hybrid engine: its inference copy of the actor (ZeRO-3 only, 1/T of the layers with
  `--inference_tp_size T`), the static KV cache, and the gathered layer group while refilling.

On the CPU the "device" is host memory shared by the node's ranks, and a process also holds the
interpreter, torch, DeepSpeed, transformers and the data: a measured baseline (`CPU_BASELINE_BYTES`)
is added there. `benchmarks/bench_memory.py` compares the plan with measured peaks (VmHWM).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
from dataclasses import dataclass, field

GiB = 1024**3
MiB = 1024**2
FIT_FRACTION = 0.92  # of device memory: the runtime's context and allocator fragmentation take the rest
CPU_BASELINE_BYTES = {1: 495 * MiB, 2: 500 * MiB, 3: 520 * MiB}  # VmHWM of each step with the 0.3M tiny-opt
ZERO3_GATHERED = 2 * 3e7  # parameters ZeRO-3 may hold gathered: max live + prefetch bucket (ds_config.py)


# ---- model shapes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What the plan needs of one model: counts from its meta-device build, sizes from its config."""

    name: str
    family: str
    params: int
    largest_layer: int  # DeepSpeed's "largest layer": the most parameters one module holds directly
    layer_params: int  # parameters inside the transformer layers (the part TP splits)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    eager_attention: bool  # attention probabilities materialised (s² per head) instead of SDPA
    linears: tuple[tuple[str, int, int, bool], ...] = field(repr=False)  # (name, in, out, bias)

    def lora(self, module_name: str, dim: int) -> tuple[int, int]:
        """(LoRA factor parameters added, base parameters LoRA freezes) for `--lora_module_name`, `--lora_dim`."""
        if dim <= 0:
            return 0, 0
        hits = [(i, o, b) for name, i, o, b in self.linears if module_name in name]
        return sum(dim * (i + o) for i, o, _ in hits), sum(i * o + (o if b else 0) for i, o, b in hits)


def _config(name_or_path: str):
    from dschat_hal.models.lm import padded_vocab_size
    from dschat_hal.models.tiny import TINY_MODELS, is_tiny, tiny_config

    if is_tiny(name_or_path):
        from dschat_hal.models.lm import load_tokenizer

        return tiny_config(TINY_MODELS[name_or_path], padded_vocab_size(load_tokenizer(name_or_path)))
    from transformers import AutoConfig

    from dschat_hal.errors import UserError
    from dschat_hal.models.lm import check_model_source

    check_model_source(name_or_path, need_weights=False)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the model config of {name_or_path!r} ({str(err).splitlines()[0]})") from None


def _first(config, *keys: str, default=None):
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


@functools.lru_cache(maxsize=32)
def model_shape(name_or_path: str, head: bool = True) -> Shape:
    """The shape of a causal LM (`head`) or of a reward model (backbone + value head)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    config = _config(name_or_path)
    with torch.device("meta"):  # shapes only; unlike accelerate's init_empty_weights, tied heads stay one tensor
        model = (AutoModelForCausalLM if head else AutoModel).from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    params = sum(unique.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer_params = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.\d+\.", n))
    linears = tuple(
        (n, m.in_features, m.out_features, m.bias is not None)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    if not head:  # the reward model's value head (hidden -> 1, no bias)
        value_in = _first(config, "word_embed_proj_dim", "hidden_size", "n_embd")
        params += value_in
        linears += (("v_head", value_in, 1, False),)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return Shape(
        name=name_or_path,
        family=config.model_type,
        params=params,
        largest_layer=largest,
        layer_params=layer_params,
        layers=_first(config, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=_first(config, "num_key_value_heads", "multi_query_group_num", default=heads),
        head_dim=_first(config, "head_dim", default=hidden // heads),
        intermediate=_first(config, "intermediate_size", "ffn_dim", "n_inner", default=None) or 4 * hidden,
        vocab=model.get_input_embeddings().num_embeddings,
        gated_mlp=config.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"),
        eager_attention=attn == "eager",
        linears=linears,
    )


# ---- training states ---------------------------------------------------------------------------
@dataclass
class States:
    """Bytes per rank a trained (or frozen) model holds between steps: on the device and on the host."""

    device: float
    host: float = 0.0


def training_states(
    trainable: int, frozen: int, largest_layer: int, stage: int, ranks: int, width: int, offload: bool
) -> States:
    """Parameters, gradients and AdamW states per rank, DeepSpeed's way.

    `width` is the training dtype's bytes (2: bf16/fp16, 4: fp32). Mixed precision keeps fp32 master
    weights and fp32 gradients beside the 16-bit ones (DeepSpeed's 2 + 2 + 4 + 4 + 8 = 20 bytes per
    parameter at ZeRO 0, 2 + 18/N at ZeRO 2; ZeRO 3 keeps no whole 16-bit gradient: 18/N + 4 x the
    largest layer for its gather buffer); in fp32 the
    master copy stays (ZeRO >= 1 clones the partition) but no second gradient copy is made. With
    `--offload` the optimizer's part lives on the host, where the gradients go straight into its
    fp32 buffer (ZeRO-3: the parameters too; the device gathers one layer at a time).
    """
    params = trainable + frozen
    opt_split = ranks if stage >= 1 else 1
    master = 4 * trainable / opt_split if (width < 4 or stage >= 1) else 0.0
    fp32_grads = 4 * trainable / opt_split if width < 4 else 0.0
    optimizer = master + fp32_grads + 8 * trainable / opt_split
    grads = width * trainable / (ranks if stage >= 2 else 1)
    if stage == 3 and width < 4:  # ZeRO-3 reduces 16-bit gradients in buckets straight into the fp32 partition
        grads = 0.0
    weights = width * params / (ranks if stage == 3 else 1)
    gather = 4 * largest_layer if stage == 3 else 0.0
    if offload and stage == 3:
        return States(device=gather, host=weights + optimizer)
    if offload:
        return States(device=weights, host=optimizer)
    return States(device=weights + grads + optimizer + gather)


def frozen_states(params: int, stage: int, ranks: int, width: int, offload: bool) -> States:
    """A forward-only model (reference, reward, EMA): its weights, partitioned under ZeRO-3."""
    weights = width * params / (ranks if stage == 3 else 1)
    return States(device=0.0, host=weights) if offload and stage == 3 else States(device=weights)


# ---- activations -------------------------------------------------------------------------------
# Bytes per token one transformer layer keeps for its backward pass, measured on the CPU with
# torch.autograd.graph.saved_tensors_hooks (parameters excluded) for transformers 4.55's models
# and fitted exactly over hidden, KV-head and intermediate sizes (`tests/test_memory_plan.py` holds
# the fit against the hooks): in elements of the training dtype,
# - OPT (ReLU MLP, SDPA): 7h + 2kv + I (the ReLU keeps only its output, which fc2 shares);
# - Llama-like (gated SiLU MLP, RMSNorm, SDPA): 7h + 2kv + 4I, plus each of the two RMSNorms keeps
#   an fp32 copy of its input (4h bytes each) when training in 16 bits;
# - BLOOM (GELU MLP, eager attention with ALiBi): 8h + 2I + 3 x heads x seq (scores, probabilities);
# - others: as Llama-like when the MLP is gated, as BLOOM's MLP with SDPA otherwise;
# dropout masks: 4h bytes (one byte per element of each dropped activation).
def layer_bytes(shape: Shape, seq: int, width: int, dropout: bool) -> float:
    """Bytes per token one transformer layer keeps for backward."""
    h, kv, inter = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    if shape.family == "opt":
        elements = 7 * h + 2 * kv + inter
        extra = 0.0
    elif shape.gated_mlp:
        elements = 7 * h + 2 * kv + 4 * inter
        extra = 2 * 4 * h if width < 4 else 0.0
    else:
        elements = 8 * h + 2 * inter
        extra = 0.0
    if shape.eager_attention:
        elements += 3 * shape.heads * seq
    return elements * width + extra + (4 * h if dropout else 0)


def training_activations(
    shape: Shape, batch: int, seq: int, width: int, checkpointing: bool, dropout: bool, logits: bool, fp32_loss: bool
) -> float:
    """Bytes alive at the start of the backward pass of one micro-batch of `batch` x `seq` tokens:
    the layers' saved tensors (with checkpointing: one hidden state per layer plus one layer
    recomputed), the final norm and head input, and the loss's copies of the logits (the logits,
    their shifted copy and log-softmax; in fp32 the upcast copy and an fp32 log-softmax)."""
    tokens = batch * seq
    per_layer = tokens * layer_bytes(shape, seq, width, dropout)
    if checkpointing:
        layers = shape.layers * tokens * shape.hidden * width + per_layer
    else:
        layers = shape.layers * per_layer
    rest = 2 * tokens * shape.hidden * width
    head = tokens * shape.vocab * ((width + 8) if fp32_loss else 3 * width) if logits else 0.0
    return layers + rest + head


def zero_buffers(stage: int, trainable: int, width: int, device: str) -> float:
    """DeepSpeed's gradient bucket: `reduce_bucket_size` (5e8) elements allocated at each backward
    under ZeRO 1-3 with contiguous gradients (ZeRO-1 stages it in fp32). A device allocator commits
    all of it; on the CPU only the pages written (one model's gradients at most) count."""
    if stage == 0:
        return 0.0
    elements = 5e8 if device != "cpu" else min(5e8, trainable)
    return elements * (4 if stage == 1 else width)


def zero3_gathered(params: int, stage: int, width: int) -> float:
    """Weights ZeRO-3 holds gathered while a model computes (up to its live and prefetch limits)."""
    return width * min(params, ZERO3_GATHERED) if stage == 3 else 0.0


def optimizer_step_bytes(stage: int, trainable: int, ranks: int, device: str) -> float:
    """Temporaries of gradient reduction and the optimizer step on the CPU, where torch's AdamW
    runs (devices use fused kernels): 8 bytes per trained parameter of the rank's partition, as
    measured (benchmarks/RESULTS_memory.md) - the size of AdamW's two fp32 denominator temporaries
    over DeepSpeed's flat partition, and of ZeRO-0's flat fp32 gradient copy for its all-reduce."""
    if device != "cpu":
        return 0.0
    return 8.0 * trainable / (ranks if stage >= 1 else 1)


def inference_activations(shape: Shape, batch: int, seq: int, width: int) -> float:
    """Bytes of a no-grad forward's working set: one layer's largest temporaries."""
    return batch * seq * (4 * shape.hidden + 2 * shape.intermediate) * width


def kv_cache_bytes(shape: Shape, batch: int, length: int, width: int, tp: int = 1) -> float:
    return 2 * shape.layers * batch * length * shape.kv_heads * shape.head_dim * width / tp


# ---- the plan --------------------------------------------------------------------------------
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


def _width(args: argparse.Namespace, device: str) -> tuple[int, str]:
    import torch

    resolved = getattr(args, "dtype_resolved", None)
    if resolved is None:
        name = args.dtype
        if name in (None, "auto"):
            if device == "cpu":
                from accel.cpu import native_bf16_flags

                name = "bf16" if native_bf16_flags() else "fp32"
            else:
                name = "bf16"
        return (4, "fp32") if name == "fp32" else (2, name)
    return (4, "fp32") if resolved == torch.float32 else (2, str(resolved).removeprefix("torch."))


def _trained(shape: Shape, args, prefix: str, keep: int = 0) -> tuple[int, int]:
    """(trainable, frozen) parameters with LoRA / --only_optimize_lora; `keep` stays trainable."""
    lora, lora_frozen = shape.lora(getattr(args, f"{prefix}lora_module_name"), getattr(args, f"{prefix}lora_dim"))
    if lora and args.only_optimize_lora:
        return lora + keep, shape.params
    return shape.params - lora_frozen + lora, lora_frozen


def _dropout(args, prefix: str) -> bool:
    value = getattr(args, f"{prefix}dropout", None)
    return value is None or value > 0


def _fp32_loss(args) -> bool:
    """`--compute_fp32_loss` (a device's own default, e.g. bloom/llama on Gaudi, is the flag the
    example scripts pass)."""
    return bool(getattr(args, "compute_fp32_loss", None))


def supervised_plan(args, step: int, device: str, ranks: int, memory: float | None) -> Plan:
    """Steps 1 and 2: one trained model, one training phase."""
    width, dtype = _width(args, device)
    shape = model_shape(args.model_name_or_path, head=step == 1)
    trainable, frozen = _trained(shape, args, "", keep=shape.hidden if step == 2 else 0)
    states = training_states(trainable, frozen, shape.largest_layer, args.zero_stage, ranks, width, args.offload)
    rows = args.per_device_train_batch_size * (2 if step == 2 else 1)  # step 2: chosen and rejected rows
    act = training_activations(
        shape,
        rows,
        args.max_seq_len,
        width,
        args.gradient_checkpointing,
        _dropout(args, ""),
        logits=step == 1,
        fp32_loss=_fp32_loss(args),
    )
    resident = {
        "training states": states.device,
        "ZeRO buffers": zero_buffers(args.zero_stage, trainable, width, device),
    }
    if device == "cpu":
        resident = {"process baseline": CPU_BASELINE_BYTES[step], **resident, "host": states.host}
    gathered = zero3_gathered(shape.params, args.zero_stage, width)
    phases = [Phase("training", {**resident, "ZeRO-3 gathered weights": gathered, "activations": act})]
    if device == "cpu":
        adam = optimizer_step_bytes(args.zero_stage, trainable, ranks, device)
        # glibc keeps freed small chunks (activations, gathered layers) in its heap: the step comes on top
        freed = {"freed activations": act, "freed gathered weights": gathered}
        phases.append(Phase("optimizer step", {**resident, **freed, "AdamW temporaries": adam}))
    plan = Plan(step, device, ranks, memory, dtype, phases, host=states.host)
    plan.notes.append(
        f"{shape.name}: {shape.params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trained), "
        f"ZeRO {args.zero_stage}{' + offload' if args.offload else ''}, micro-batch {rows} rows x {args.max_seq_len}"
        + (" (chosen + rejected)" if step == 2 else "")
    )
    return plan


def rlhf_plan(args, device: str, ranks: int, memory: float | None) -> Plan:
    """Step 3: resident actor/critic states and frozen reference/reward, then the three phases."""
    width, dtype = _width(args, device)
    actor = model_shape(args.actor_model_name_or_path, head=True)
    critic = model_shape(args.critic_model_name_or_path, head=False)
    a_stage, c_stage = args.actor_zero_stage, args.critic_zero_stage
    a_train, a_frozen = _trained(actor, args, "actor_")
    c_train, c_frozen = _trained(critic, args, "critic_")
    actor_states = training_states(a_train, a_frozen, actor.largest_layer, a_stage, ranks, width, args.offload)
    critic_states = training_states(c_train, c_frozen, critic.largest_layer, c_stage, ranks, width, args.offload)
    ref = frozen_states(actor.params, a_stage, ranks, width, args.offload_reference_model)
    reward = frozen_states(critic.params, c_stage, ranks, width, args.offload_reward_model)
    resident = {
        "actor states": actor_states.device,
        "critic states": critic_states.device,
        "reference": ref.device,
        "reward": reward.device,
    }
    host = actor_states.host + critic_states.host + ref.host + reward.host
    if args.enable_ema:  # the EMA copy: the actor with its LoRA factors, built with offload on
        lora_added = actor.lora(args.actor_lora_module_name, args.actor_lora_dim)[0]
        ema = frozen_states(actor.params + lora_added, a_stage, ranks, width, True)
        resident["actor EMA"] = ema.device
        host += ema.host
    resident["ZeRO buffers"] = zero_buffers(a_stage, a_train, width, device) + zero_buffers(
        c_stage, c_train, width, device
    )
    if device == "cpu":
        resident = {"process baseline": CPU_BASELINE_BYTES[3], **resident, "host": host}

    gen_batch, train_batch = args.per_device_generation_batch_size, args.per_device_training_batch_size
    seq = args.max_prompt_seq_len + args.max_answer_seq_len
    tp = max(1, int(getattr(args, "inference_tp_size", 1) or 1))
    hybrid = args.enable_hybrid_engine
    copy_bytes = 0.0
    refill = 0.0
    if hybrid and a_stage == 3:
        layers_part = actor.layer_params / tp
        copy_bytes = width * (actor.params - actor.layer_params + layers_part)
        group = args.tp_gather_partition_size or actor.layers
        refill = width * actor.layer_params * min(group, actor.layers) / actor.layers
    cache = kv_cache_bytes(actor, gen_batch, seq, width, tp if hybrid else 1)
    keep_copy = copy_bytes if not args.unpin_actor_parameters else 0.0
    keep_cache = (
        cache if hybrid and not (args.release_inference_cache or (copy_bytes and args.unpin_actor_parameters)) else 0.0
    )

    generation = dict(resident)
    if copy_bytes:
        generation.update({"inference copy": copy_bytes, "gathered layer group": refill})
    generation["KV cache"] = cache
    generation["decode working set"] = inference_activations(actor, gen_batch, args.max_prompt_seq_len, width) + (
        4 * gen_batch * actor.vocab
    )
    experience = dict(resident)
    if keep_copy:
        experience["inference copy"] = keep_copy
    if keep_cache:
        experience["KV cache"] = keep_cache
    experience["ZeRO-3 gathered weights"] = max(
        zero3_gathered(actor.params, a_stage, width), zero3_gathered(critic.params, c_stage, width)
    )
    experience["actor + reference logits"] = gen_batch * seq * actor.vocab * (2 * width + 8)  # + fp32 log-softmax
    experience["forward working set"] = inference_activations(actor, gen_batch, seq, width)
    training = dict(resident)
    if keep_copy:
        training["inference copy"] = keep_copy
    if keep_cache:
        training["KV cache"] = keep_cache
    fp32_loss = True  # log-probs are computed in fp32
    actor_act = training_activations(
        actor, train_batch, seq, width, args.actor_gradient_checkpointing, _dropout(args, "actor_"), True, fp32_loss
    )
    critic_act = training_activations(
        critic, train_batch, seq, width, args.critic_gradient_checkpointing, _dropout(args, "critic_"), False, False
    )
    training["ZeRO-3 gathered weights"] = max(
        zero3_gathered(actor.params, a_stage, width), zero3_gathered(critic.params, c_stage, width)
    )
    training["actor activations" if actor_act >= critic_act else "critic activations"] = max(actor_act, critic_act)
    phases = [Phase("generation", generation), Phase("experience", experience), Phase("training", training)]
    if device == "cpu":
        step_parts = {(k if not k.endswith("activations") else "freed activations"): v for k, v in training.items()}
        step_parts.pop("ZeRO-3 gathered weights")
        step_parts["freed gathered weights"] = zero3_gathered(actor.params, a_stage, width) + zero3_gathered(
            critic.params, c_stage, width
        )
        step_parts["AdamW temporaries"] = max(
            optimizer_step_bytes(a_stage, a_train, ranks, device), optimizer_step_bytes(c_stage, c_train, ranks, device)
        )
        phases.append(Phase("optimizer step", step_parts))
    plan = Plan(3, device, ranks, memory, dtype, phases, host=host)
    plan.notes.append(
        f"actor {actor.name}: {actor.params / 1e6:.1f}M ({a_train / 1e6:.1f}M trained, ZeRO {a_stage}); critic "
        f"{critic.name}: {critic.params / 1e6:.1f}M ({c_train / 1e6:.1f}M trained, ZeRO {c_stage}); "
        f"generation {gen_batch} x {seq}, training {train_batch} x {seq}"
        + (f", hybrid engine{f' TP {tp}' if tp > 1 else ''}" if hybrid else "")
    )
    return plan


def build(args: argparse.Namespace, step: int, device: str, ranks: int, memory: float | None) -> Plan:
    if step == 3:
        return rlhf_plan(args, device, ranks, memory)
    return supervised_plan(args, step, device, ranks, memory)


# ---- what would make it fit --------------------------------------------------------------------
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
            out.append((f"--inference_tp_size {tp}", {"inference_tp_size": tp}))
    for who in ("reference", "reward"):
        if not getattr(args, f"offload_{who}_model"):
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
            trial = copy.copy(current)
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


# ---- devices and budget ------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> float:
    """'40GiB', '40G' (both 2^30 units), '40GB' (10^9) or a plain number of bytes."""
    from dschat_hal.errors import UserError

    match = _SIZE.match(text or "")
    if not match:
        raise UserError(f"--device_memory {text!r} is not a size; write e.g. 40GiB, 80G or 48000MB")
    value, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).lower()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return value * base**power


def resolve_device(args: argparse.Namespace) -> str:
    import accel

    name = (args.device or "auto").lower()
    return accel.detect() if name == "auto" else name


def ranks_of(args: argparse.Namespace) -> int:
    given = getattr(args, "num_devices", None)
    if given:
        return int(given)
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_memory(args: argparse.Namespace, device: str, backend=None) -> float | None:
    """`--device_memory`, else what the backend reports free (CPU: host memory available, shared by
    this node's ranks), else unknown (None: the plan is printed but never refuses)."""
    given = getattr(args, "device_memory", None)
    if given:
        return parse_bytes(given)
    if backend is None:
        return None
    free = backend.available_memory()
    if free is None:
        return None
    if device == "cpu":  # host memory: shared by the node's ranks; what this process holds is in the plan
        free = free / int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1"))) + _rss()
    return float(free)


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# ---- output ------------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / MiB:.0f} MiB"


def render(plan: Plan) -> str:
    """The plan as text: one line per phase with its parts, the peak, and what does not fit."""
    memory = "unknown" if plan.device_memory is None else _gib(plan.device_memory)
    lines = [
        f"memory plan, step {plan.step}: {plan.ranks} rank(s) on {plan.device}, {memory} each, {plan.dtype}",
        *(f"  {n}" for n in plan.notes),
    ]
    for phase in plan.phases:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in phase.parts.items() if v)
        lines.append(f"  {phase.name:<10} {_gib(phase.total):>11} per rank  ({parts})")
    if plan.host and plan.device != "cpu":
        lines.append(f"  host (offloaded states) {_gib(plan.host)} per rank")
    lines.append(verdict(plan))
    return "\n".join(lines)


def verdict(plan: Plan) -> str:
    peak = plan.peak
    if plan.fits is None:
        return f"  peak {_gib(peak.total)} per rank ({peak.name}); device memory unknown: pass --device_memory to check"
    if plan.fits:
        return f"  fits: peak {_gib(peak.total)} per rank ({peak.name}) of {_gib(plan.budget)} usable"
    fix = " ".join(plan.fix) if plan.fix else None
    return (
        f"  does not fit: {peak.name} needs {_gib(peak.total)} per rank, {_gib(plan.budget)} usable "
        f"({FIT_FRACTION:.0%} of {_gib(plan.device_memory)}); "
        + (f"add {fix}" if fix else "no single flag here is enough: use more devices or a smaller model")
    )


def refusal(plan: Plan) -> str:
    """The one-line error a step raises before loading weights."""
    peak = plan.peak
    biggest = max(peak.parts.items(), key=lambda kv: kv[1])
    fix = f"add {' '.join(plan.fix)}" if plan.fix else "use more devices or a smaller model"
    return (
        f"the memory plan says step {plan.step} does not fit: its {peak.name} phase needs {_gib(peak.total)} per "
        f"rank ({biggest[0]} {_gib(biggest[1])}) and {_gib(plan.budget)} is usable; {fix}, or pass "
        "--skip_memory_check to try anyway (training/plan.py shows the whole plan)"
    )


def plan_for(args: argparse.Namespace, step: int, backend=None) -> Plan:
    """The plan of `args` for `step`, with the fix when it does not fit."""
    if backend is not None:
        from dschat_hal.runtime import world_size

        device, ranks = backend.name, getattr(args, "num_devices", None) or world_size()
    else:
        device, ranks = resolve_device(args), ranks_of(args)
        backend = _probe(device)
    plan = build(args, step, device, ranks, device_memory(args, device, backend))
    if plan.fits is False:
        plan.fix = find_fix(args, plan)
    return plan


def _probe(device: str):
    """The backend of `device` for its free memory, without starting distributed (None if absent)."""
    import accel

    try:
        return accel.get(device)
    except accel.DeviceUnavailableError:
        return None


def dry_run(args: argparse.Namespace, step: int) -> dict:
    """`--dry_run`: print the plan (rank 0) and return its numbers; nothing is loaded or written."""
    plan = plan_for(args, step)
    if int(os.environ.get("RANK", "0")) == 0:
        print(render(plan), flush=True)
    return summary(plan)


def check(args: argparse.Namespace, step: int, backend) -> None:
    """Before loading weights: refuse in one line (UserError) when the plan cannot fit, unless
    `--skip_memory_check`; an unknown device memory never refuses."""
    from dschat_hal.errors import UserError

    if getattr(args, "skip_memory_check", False):
        return
    plan = plan_for(args, step, backend)
    if plan.fits is False:
        raise UserError(refusal(plan))


def summary(plan: Plan) -> dict:
    """The plan as JSON-able numbers (bytes)."""
    return {
        "step": plan.step,
        "fits": plan.fits,
        "peak_phase": plan.peak.name,
        "peak_bytes": plan.peak.total,
        "phases": {p.name: {"total": p.total, **p.parts} for p in plan.phases},
        "fix": plan.fix,
        "host_bytes": plan.host,
        "device_memory": plan.device_memory,
    }
