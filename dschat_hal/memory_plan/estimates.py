"""Bytes per rank of each thing a step holds: training states, activations, buffers, caches."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_hal.memory_plan.shapes import Shape

ZERO3_GATHERED = 2 * 3e7  # parameters ZeRO-3 may hold gathered: max live + prefetch bucket (ds_config.py)


@dataclass
class States:
    """Bytes per rank a trained (or frozen) model holds between steps: on the device and on the host."""

    device: float
    host: float = 0.0


def training_states(
    trainable: int,
    frozen: int,
    largest_layer: int,
    stage: int,
    ranks: int,
    width: int,
    offload: bool,
    device: str,
) -> States:
    """Parameters, gradients and AdamW states per rank, DeepSpeed's way.

    `width` is the training dtype's bytes (2: bf16/fp16, 4: fp32). Mixed precision keeps fp32 master
    weights and fp32 gradients beside the 16-bit ones (DeepSpeed's 2 + 2 + 4 + 4 + 8 = 20 bytes per
    parameter at ZeRO 0, 2 + 18/N at ZeRO 2; ZeRO 3 keeps no whole 16-bit gradient: 18/N + 4 x the
    largest layer for its gather buffer); in fp32 the
    master copy stays (ZeRO >= 1 clones the partition) but no second gradient copy is made. With
    `--offload` the optimizer's part lives on the host, where the gradients go straight into its
    fp32 buffer (ZeRO-3: the parameters too; the device gathers one layer at a time).
    On the CPU under ZeRO 1-2 the fp32 gradients are counted where they live, in the optimizer step
    (`optimizer_step_bytes`: one group's copy at a time); devices keep the whole partition (an upper bound).
    """
    params = trainable + frozen
    opt_split = ranks if stage >= 1 else 1
    master = 4 * trainable / opt_split if (width < 4 or stage >= 1) else 0.0
    step_copy = device == "cpu" and stage in (1, 2) and not offload  # made and freed inside the step
    fp32_grads = 4 * trainable / opt_split if width < 4 and not step_copy else 0.0
    optimizer = master + fp32_grads + 8 * trainable / opt_split
    grads = gradient_bytes(trainable, stage, ranks, width)
    weights = width * params / (ranks if stage == 3 else 1)
    gather = 4 * largest_layer if stage == 3 else 0.0
    if offload and stage == 3:
        return States(device=gather, host=weights + optimizer)
    if offload:
        return States(device=weights, host=optimizer)
    return States(device=weights + grads + optimizer + gather)


def gradient_bytes(trainable: float, stage: int, ranks: int, width: int) -> float:
    """The 16-bit gradients a trained model holds from its backward to its step (part of its states)."""
    if stage == 3 and width < 4:  # ZeRO-3 reduces 16-bit gradients in buckets straight into the fp32 partition
        return 0.0
    return width * trainable / (ranks if stage >= 2 else 1)


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
    shape: Shape,
    batch: int,
    seq: int,
    width: int,
    checkpointing: bool,
    dropout: bool,
    logits: bool,
    fp32_loss: bool,
    head_positions: int | None = None,
) -> float:
    """Bytes alive at the start of the backward pass of one micro-batch of `batch` x `seq` tokens:
    the layers' saved tensors (with checkpointing: one hidden state per layer plus one layer
    recomputed), the final norm and head input, and the loss's copies of the logits (the logits,
    their shifted copy and log-softmax; in fp32 the upcast copy and an fp32 log-softmax) at
    `head_positions` per row (default all `seq`; step 3 computes the head on the answer only)."""
    tokens = batch * seq
    per_layer = tokens * layer_bytes(shape, seq, width, dropout)
    if checkpointing:
        layers = shape.layers * tokens * shape.hidden * width + per_layer
    else:
        layers = shape.layers * per_layer
    rest = 2 * tokens * shape.hidden * width
    head_tokens = batch * (seq if head_positions is None else head_positions)
    head = head_tokens * shape.vocab * ((width + 8) if fp32_loss else 3 * width) if logits else 0.0
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


def optimizer_step_bytes(
    stage: int, trainable: int, ranks: int, device: str, width: int, offload: bool, largest_param: float = 0.0
) -> float:
    """Temporaries of the optimizer step on the CPU (devices: counted in the states). ZeRO 1-2 step
    one optimizer group at a time: its gradients flattened (`width` bytes) and, in 16 bits, copied to
    fp32 (4), for the largest group (`ds_config.step_chunk`; measured, benchmarks/RESULTS_memory.md).
    ZeRO 0 and 3, and offload: 8 bytes per trained parameter of the rank's partition, as measured - ZeRO-0's
    flat fp32 gradient copy for its all-reduce, and the step's temporaries over a flat partition."""
    if device != "cpu":
        return 0.0
    if stage in (1, 2) and not offload:
        from dschat_hal.ds_config import step_chunk  # deferred: ds_config imports torch, --help must not

        return (width + (4 if width < 4 else 0)) * step_chunk(trainable, stage, offload, largest_param) / ranks
    return 8.0 * trainable / (ranks if stage >= 1 else 1)


# With the CPU backend keeping freed blocks for reuse (accel/_host_memory.py), reused blocks fragment and
# the resident set stays above what is live. Fitted, not derived: the medium and large OPT runs of steps
# 1-3 and of PPO, GRPO and ReMax peaked 4-14% above glibc's defaults (benchmarks/RESULTS_memory.md), about
# this many bytes per trained parameter.
REUSED_HEAP_BYTES = 2.5


def reused_heap_bytes(trained: float, device: str) -> float:
    """The heap a CPU run keeps above its live tensors when freed blocks are reused (0 otherwise)."""
    import accel

    return REUSED_HEAP_BYTES * trained if device == "cpu" and accel.will_reuse_freed_blocks() else 0.0


def inference_activations(shape: Shape, batch: int, seq: int, width: int) -> float:
    """Bytes of a no-grad forward's working set: one layer's largest temporaries."""
    return batch * seq * (4 * shape.hidden + 2 * shape.intermediate) * width


def kv_cache_bytes(shape: Shape, batch: int, length: int, width: int, tp: int = 1) -> float:
    return 2 * shape.layers * batch * length * shape.kv_heads * shape.head_dim * width / tp
